"""Vision-language datasets: builders for the formats users have, all yielding conversations.

Every builder is ``make_<name>_dataset(path_or_dataset, split, ...)`` and returns a map-style
dataset whose samples are ``{"conversation": [...]}`` with images decoded in ``__getitem__``.
"""

from automodel.datasets.vlm.base import ConversationDataset
from automodel.datasets.vlm.columns import (
    make_hf_dataset,
    make_image_text_dataset,
    make_vqa_dataset,
)
from automodel.datasets.vlm.conversation import make_conversation_dataset
from automodel.datasets.vlm.cord_v2 import CordV2Dataset, make_cord_v2_dataset

__all__ = [
    "ConversationDataset",
    "CordV2Dataset",
    "make_conversation_dataset",
    "make_cord_v2_dataset",
    "make_hf_dataset",
    "make_image_text_dataset",
    "make_vqa_dataset",
]
