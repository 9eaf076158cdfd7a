"""Vision-language datasets: CORD-v2 receipt parsing and its offline synthetic stand-in."""

from automodel.datasets.vlm.cord_v2 import CordV2Dataset, make_cord_v2_dataset
from automodel.datasets.vlm.receipts import CATALOGUE, make_receipts

__all__ = ["CATALOGUE", "CordV2Dataset", "make_cord_v2_dataset", "make_receipts"]
