from automodel.loss.masked_ce import MaskedCrossEntropy

__all__ = ["MaskedCrossEntropy"]
