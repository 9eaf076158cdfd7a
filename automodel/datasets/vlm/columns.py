"""Datasets with one image, one question (or a fixed instruction) and one answer per record.

- ``make_image_text_dataset``: the tutorial's JSONL, ``{"image": "scan.jpg", "text": "..."}``,
  answered after a configurable instruction.
- ``make_vqa_dataset``: image, question and answer columns (MedPix-VQA style).
- ``make_hf_dataset``: any Hugging Face dataset (hub id, local folder, ``imagefolder`` with
  ``metadata.jsonl``, parquet, arrow, ``save_to_disk``) with a column mapping.

All three read any format ``open_records`` reads and share one dataset class. An image column may
hold ``datasets.Image`` values, paths (relative ones resolve against the data file's folder),
``data:`` URLs, or a list of them for several images.
"""

from __future__ import annotations

import json
import os
from typing import Any

import datasets
import numpy as np

from automodel.datasets.vlm.base import (
    ConversationDataset,
    check_image_size,
    image_part,
    select_indices,
    set_image_root,
    text_part,
)
from automodel.datasets.vlm.sources import BadSampleError, RecordSource, open_records
from automodel.errors import UsageError

DEFAULT_INSTRUCTION = "Describe this image."

PathOrDataset = str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict


class ColumnsDataset(ConversationDataset):
    """One user turn (images, then the question or instruction) and one assistant answer."""

    def __init__(
        self,
        source: RecordSource,
        indices: np.ndarray,
        image_size: int | None,
        image_column: str,
        question_column: str | None,
        answer_column: str,
        prompt: str | None,
        what: str,
    ) -> None:
        super().__init__(source, indices, image_size)
        self.image_column = image_column
        self.question_column = question_column
        self.answer_column = answer_column
        self.prompt = prompt
        self.what = what

    @property
    def default_metric(self) -> str:
        """Questions with short answers are scored as VQA; a fixed instruction as captions."""
        return "vqa" if self.question_column else "caption"

    def to_conversation(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        images = _field(record, self.image_column, "image_column")
        values = images if isinstance(images, list) else [images]
        if not values:
            raise BadSampleError(f"the {self.image_column!r} field holds no image")
        user = [image_part(self.image_ref(v)) for v in values]
        if self.question_column is not None:
            question = _field(record, self.question_column, "question_column")
            if question is None or not str(question).strip():
                raise BadSampleError(f"the question ({self.question_column!r}) is empty")
            user.append(text_part(str(question)))
        elif self.prompt:
            user.append(text_part(self.prompt))
        answer = _field(record, self.answer_column, "answer_column")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise BadSampleError(f"no reply: the answer ({self.answer_column!r}) is empty")
        if not isinstance(answer, str):
            answer = (
                json.dumps(answer, ensure_ascii=False)
                if isinstance(answer, (dict, list))
                else str(answer)
            )
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [text_part(answer)]},
        ]


def _field(record: dict[str, Any], column: str, key: str) -> Any:
    if column not in record:
        raise BadSampleError(
            f"no {column!r} field ({key}); the record has: {', '.join(map(str, record)) or 'nothing'}"
        )
    return record[column]


def _build(
    path_or_dataset: PathOrDataset,
    split: str,
    what: str,
    image_column: str,
    question_column: str | None,
    answer_column: str,
    prompt: str | None,
    image_size: int | None,
    limit: int | None,
    val_fraction: float | None,
    seed: int,
    image_root: str | os.PathLike[str] | None,
) -> ColumnsDataset:
    check_image_size(image_size, what)
    for key, column in (("image_column", image_column), ("answer_column", answer_column)):
        if not isinstance(column, str) or not column:
            raise UsageError(f"{what} {key}={column!r} must name a column.")
    source = open_records(path_or_dataset, split, what, holdout=val_fraction is not None)
    set_image_root(source, image_root)
    fields = source.fields()
    if fields is not None:
        # A fixed schema: a wrong column name is a config mistake, reported before anything runs.
        for key, column in (
            ("image_column", image_column),
            ("question_column", question_column),
            ("answer_column", answer_column),
        ):
            if column is not None and column not in fields:
                raise UsageError(
                    f"{source.name} has no column {column!r} ({key}); its columns are: "
                    f"{', '.join(fields)}. Set {key} to one of them."
                )
    indices = select_indices(source, split, val_fraction, seed, limit, what)
    return ColumnsDataset(
        source, indices, image_size, image_column, question_column, answer_column, prompt, what
    )


def make_image_text_dataset(
    path_or_dataset: PathOrDataset,
    split: str = "train",
    prompt: str = DEFAULT_INSTRUCTION,
    image_column: str = "image",
    text_column: str = "text",
    image_size: int | None = None,
    limit: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    image_root: str | os.PathLike[str] | None = None,
) -> ColumnsDataset:
    """Image-text pairs (the tutorial's ``{"image": path, "text": ...}`` JSONL) as conversations.

    Each sample is the image and ``prompt`` from the user, answered by ``text``.

    Args:
        path_or_dataset: a ``.jsonl`` / ``.json`` file, a folder with ``<split>.jsonl``, or any
            source ``make_hf_dataset`` reads.
        split: ``train``; ``validation`` with ``val_fraction``, or in a folder that has it.
        prompt: the instruction the user turn carries after the image.
        image_column: the field holding the image path (or a list of paths).
        text_column: the field holding the target text.
        image_size: when set, images are resized to fit within ``image_size`` pixels.
        limit: keep only the first ``limit`` samples.
        val_fraction: hold out this seeded share of the records; ``split`` picks the side.
        seed: the hold-out permutation's seed.
        image_root: resolve relative image paths against this folder instead of the data
            file's (e.g. a hub dataset whose paths point into a local image folder).

    Returns:
        A map-style dataset that decodes images in ``__getitem__``.
    """
    return _build(
        path_or_dataset, split, "image-text dataset", image_column, None, text_column, prompt,
        image_size, limit, val_fraction, seed, image_root,
    )  # fmt: skip


def make_vqa_dataset(
    path_or_dataset: PathOrDataset,
    split: str = "train",
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    image_size: int | None = None,
    limit: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    image_root: str | os.PathLike[str] | None = None,
) -> ColumnsDataset:
    """Visual question answering (image, question, answer) as conversations, MedPix-VQA style.

    Args:
        path_or_dataset: hub id, local folder or file (see ``make_hf_dataset``), or a dataset.
        split: the split to read (``validation`` with ``val_fraction`` picks the held-out side).
        image_column: the column with the image (an ``Image`` feature or a path).
        question_column: the column with the question, the user's text.
        answer_column: the column with the answer, the assistant's reply.
        image_size: when set, images are resized to fit within ``image_size`` pixels.
        limit: keep only the first ``limit`` samples.
        val_fraction: hold out this seeded share of the ``train`` records.
        seed: the hold-out permutation's seed.
        image_root: resolve relative image paths against this folder instead of the data
            file's (e.g. a hub dataset whose paths point into a local image folder).

    Returns:
        A map-style dataset that decodes images in ``__getitem__``.
    """
    return _build(
        path_or_dataset, split, "VQA dataset", image_column, question_column, answer_column,
        None, image_size, limit, val_fraction, seed, image_root,
    )  # fmt: skip


def make_hf_dataset(
    path_or_dataset: PathOrDataset,
    split: str = "train",
    image_column: str = "image",
    question_column: str | None = None,
    answer_column: str = "text",
    prompt: str | None = DEFAULT_INSTRUCTION,
    image_size: int | None = None,
    limit: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    image_root: str | os.PathLike[str] | None = None,
) -> ColumnsDataset:
    """Any Hugging Face dataset as conversations, through a column mapping.

    Args:
        path_or_dataset: a hub id; a local folder (``data/<split>-*.parquet``, an
            ``imagefolder`` with ``metadata.jsonl``, a ``save_to_disk`` copy, ``<split>.jsonl``);
            a ``.parquet`` / ``.arrow`` / ``.csv`` / ``.jsonl`` file; or a loaded dataset.
        split: the split to read (slicing such as ``train[:100]`` works for hub and folder
            datasets).
        image_column: the column with the image(s).
        question_column: the column with the user's question; ``None`` uses ``prompt``.
        answer_column: the column with the assistant's reply.
        prompt: the user's text when there is no ``question_column``.
        image_size: when set, images are resized to fit within ``image_size`` pixels.
        limit: keep only the first ``limit`` samples.
        val_fraction: hold out this seeded share of the ``train`` records.
        seed: the hold-out permutation's seed.
        image_root: resolve relative image paths against this folder instead of the data
            file's (e.g. a hub dataset whose paths point into a local image folder).

    Returns:
        A map-style dataset that decodes images in ``__getitem__``.

    Raises:
        UsageError: the source cannot be read or a named column does not exist (the message
            lists the columns that do).
    """
    return _build(
        path_or_dataset, split, "Hugging Face dataset", image_column, question_column,
        answer_column, prompt, image_size, limit, val_fraction, seed, image_root,
    )  # fmt: skip
