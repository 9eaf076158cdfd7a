from automodel.loss.chunked import ChunkedCrossEntropy, LigerFusedLinearCrossEntropy, label_loss
from automodel.loss.masked_ce import MaskedCrossEntropy

__all__ = [
    "ChunkedCrossEntropy",
    "LigerFusedLinearCrossEntropy",
    "MaskedCrossEntropy",
    "label_loss",
]
