"""CORD-v2 receipt parsing as a conversation dataset for VLM fine-tuning.

``make_cord_v2_dataset`` reads the hub dataset ``naver-clova-ix/cord-v2`` or any local copy with
its ``image`` and ``ground_truth`` columns (a folder in the hub layout ``data/<split>-*.parquet``
such as the synthetic receipts from ``make_receipts``, a ``save_to_disk`` folder, a ``.parquet``
or ``.arrow`` file) and yields one user/assistant conversation per receipt: the receipt image plus
an instruction, answered by the receipt's ``gt_parse`` as JSON or as Donut-style tokens.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, get_args

import datasets
import numpy as np
from PIL import Image

from automodel.datasets.vlm.base import (
    ConversationDataset,
    check_image_size,
    image_part,
    load_image,
    select_indices,
    text_part,
)
from automodel.datasets.vlm.sources import (
    ArrowSource,
    BadSampleError,
    RecordSource,
    one_line,
    open_records,
)
from automodel.errors import UsageError
from automodel.paths import is_local_path

HUB_ID = "naver-clova-ix/cord-v2"

DEFAULT_PROMPT = "Read this receipt. List each item with its count and price, then the total."

TargetFormat = Literal["json", "donut"]
TARGET_FORMATS: tuple[str, ...] = get_args(TargetFormat)

REQUIRED_COLUMNS: tuple[str, ...] = ("image", "ground_truth")

_LOCAL_HINT = (
    "a folder laid out like naver-clova-ix/cord-v2 (data/<split>-*.parquet with image and "
    "ground_truth columns), e.g. one written by automodel.demo.receipts.make_receipts"
)


def gt_parse_to_json(gt_parse: Any) -> str:
    """Serialise a ``gt_parse`` dict as compact one-line JSON, keeping its stored key order.

    Args:
        gt_parse: the parsed receipt (``ground_truth["gt_parse"]``).

    Returns:
        The JSON string; ``json.loads`` gives back ``gt_parse``.
    """
    return json.dumps(gt_parse, ensure_ascii=False, separators=(", ", ": "))


def gt_parse_to_donut(obj: Any) -> str:
    """Serialise a ``gt_parse`` dict as Donut tokens (the Donut paper's ``json2token``).

    Dict keys become ``<s_key>...</s_key>`` in stored order (Donut's ``sort_json_key=False``),
    list items are joined with ``<sep/>``, and a dict holding only ``text_sequence`` becomes its
    text, e.g. ``{"menu": [{"nm": "Latte"}, {"nm": "Tea"}]}`` ->
    ``<s_menu><s_nm>Latte</s_nm><sep/><s_nm>Tea</s_nm></s_menu>``.

    Args:
        obj: a ``gt_parse`` dict, or any value nested in one.

    Returns:
        The token string.
    """
    if isinstance(obj, dict):
        if len(obj) == 1 and "text_sequence" in obj:
            return str(obj["text_sequence"])
        return "".join(
            f"<s_{key}>{gt_parse_to_donut(value)}</s_{key}>" for key, value in obj.items()
        )
    if isinstance(obj, list):
        return "<sep/>".join(gt_parse_to_donut(item) for item in obj)
    return str(obj)


class CordV2Dataset(ConversationDataset):
    """Map-style dataset of CORD-v2 receipts as user/assistant conversations.

    Rows stay in the Arrow table; an image is decoded only when its item is requested.
    """

    default_metric = "cord"  # field F1, nTED accuracy, JSON validity (automodel.eval)

    what = "CORD-v2 dataset"

    def __init__(
        self,
        source: RecordSource,
        indices: np.ndarray,
        prompt: str,
        target_format: str,
        image_size: int | None,
    ) -> None:
        super().__init__(source, indices, image_size)
        self.prompt = prompt
        self.target_format = target_format

    def to_conversation(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": [image_part(self.image_ref(record["image"])), text_part(self.prompt)]},
            {"role": "assistant", "content": [text_part(self._serialise(_parse_truth(record["ground_truth"])))]},
        ]  # fmt: skip

    def _serialise(self, parse: dict[str, Any]) -> str:
        return gt_parse_to_json(parse) if self.target_format == "json" else gt_parse_to_donut(parse)

    def gt_parse(self, idx: int) -> dict[str, Any]:
        """Return the ``gt_parse`` dict of one receipt, without decoding its image.

        Args:
            idx: sample index.

        Returns:
            The receipt's ``gt_parse``.

        Raises:
            UsageError: the row's ``ground_truth`` is not CORD-v2 JSON.
        """
        record = self.source.read(self.record_index(idx))
        try:
            return _parse_truth(record["ground_truth"])
        except BadSampleError as exc:
            raise UsageError(
                f"{self.location(idx)}: {exc}; regenerate the data or fix that row."
            ) from None

    def target(self, idx: int) -> str:
        """Return the assistant answer for one receipt, without decoding its image.

        Args:
            idx: sample index.

        Returns:
            ``gt_parse`` as JSON or Donut tokens, per ``target_format``.
        """
        return self._serialise(self.gt_parse(idx))

    def image(self, idx: int) -> Image.Image:
        """Decode one receipt image as RGB, fitted within ``image_size`` when that is set.

        Args:
            idx: sample index.

        Returns:
            The RGB image.
        """
        record = self.source.read(self.record_index(idx))
        try:
            return load_image(self.image_ref(record["image"]), self.image_size)
        except BadSampleError as exc:
            raise UsageError(f"{self.location(idx)}: {exc}.") from None


def _parse_truth(raw: Any) -> dict[str, Any]:
    try:
        parse = json.loads(raw)["gt_parse"]
    except (TypeError, ValueError, KeyError) as exc:
        raise BadSampleError(
            f"ground_truth is not JSON with a 'gt_parse' object ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(parse, dict):
        raise BadSampleError(
            f"ground_truth['gt_parse'] is a {type(parse).__name__}, expected an object"
        )
    return parse


def _check_arguments(path_or_dataset, target_format: str, image_size, limit) -> None:
    """Refuses unusable arguments before any data is read, naming the fix."""
    if target_format not in TARGET_FORMATS:
        raise UsageError(
            f"CORD-v2 target_format {target_format!r} is unknown; use one of "
            f"{', '.join(TARGET_FORMATS)}."
        )
    check_image_size(image_size, "CORD-v2")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UsageError(f"CORD-v2 limit={limit!r} must be a positive integer or null.")
    if isinstance(path_or_dataset, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(path_or_dataset))
        if is_local_path(path) and not os.path.exists(path):
            raise UsageError(
                f"CORD-v2 dataset folder {path!r} does not exist; pass {_LOCAL_HINT}, or the hub "
                f"id {HUB_ID!r}."
            )


def make_cord_v2_dataset(
    path_or_dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict = HUB_ID,
    split: str = "train",
    prompt: str = DEFAULT_PROMPT,
    target_format: TargetFormat = "json",
    image_size: int | None = None,
    limit: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> CordV2Dataset:
    """Build the CORD-v2 receipt-parsing dataset as user/assistant conversations.

    Each item is ``{"conversation": [user, assistant]}``: the user turn holds the receipt image
    (RGB PIL) and ``prompt``; the assistant turn holds the receipt's ``gt_parse`` serialised per
    ``target_format``. Images are decoded lazily, one per ``__getitem__``.

    Args:
        path_or_dataset: hub id; a local folder in the hub layout (``data/<split>-*.parquet``) or
            saved with ``save_to_disk``; a ``.parquet`` / ``.arrow`` file (read as ``train``); or
            an already loaded ``datasets.Dataset``/``DatasetDict``.
        split: split to read (``train``, ``validation`` or ``test`` for CORD-v2); slicing such
            as ``train[:100]`` works as in ``datasets.load_dataset``.
        prompt: the user instruction that follows the image.
        target_format: ``"json"`` (compact JSON of ``gt_parse``) or ``"donut"`` (Donut tokens).
        image_size: when set, images are resized to fit within ``image_size`` x ``image_size``,
            keeping their aspect ratio.
        limit: keep only the first ``limit`` rows.
        val_fraction: hold out this seeded share of the ``train`` rows; ``split`` (``train`` or
            ``validation``) picks the side.
        seed: the hold-out permutation's seed.

    Returns:
        A map-style ``torch.utils.data.Dataset``.

    Raises:
        UsageError: the path, split, columns or arguments are unusable, or the hub dataset cannot
            be loaded.
    """
    _check_arguments(path_or_dataset, target_format, image_size, limit)
    source = open_records(path_or_dataset, split, "CORD-v2 dataset", val_fraction is not None)
    fields = source.fields() or []
    missing = [column for column in REQUIRED_COLUMNS if column not in fields]
    if missing:
        raise UsageError(
            f"{source.name} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(fields)}); CORD-v2 data needs image and ground_truth columns."
        )
    assert isinstance(source, ArrowSource)
    source.rows = _image_column(source.rows, source.name)
    indices = select_indices(source, split, val_fraction, seed, limit, "CORD-v2")
    return CordV2Dataset(source, indices, prompt, target_format, image_size)


def _image_column(rows: datasets.Dataset, name: str) -> datasets.Dataset:
    """Make a raw image column (bytes or paths) an undecoded ``datasets.Image`` feature."""
    feature = rows.features["image"]
    if isinstance(feature, datasets.Image):
        return rows
    try:
        return rows.cast_column("image", datasets.Image(decode=False))
    except Exception as exc:  # noqa: BLE001 - reported as a data problem
        raise UsageError(
            f"{name}: the image column ({feature}) cannot be read as images ({one_line(exc)})."
        ) from None
