"""CORD-v2 receipt parsing as a conversation dataset for VLM fine-tuning.

``make_cord_v2_dataset`` reads the hub dataset ``naver-clova-ix/cord-v2`` or any local folder in
its layout (``data/<split>-*.parquet`` with ``image`` and ``ground_truth`` columns, such as the
synthetic receipts from ``make_receipts``) and yields one user/assistant conversation per receipt:
the receipt image plus an instruction, answered by the receipt's ``gt_parse`` as JSON or as
Donut-style tokens.
"""

from __future__ import annotations

import json
import operator
import os
import re
from typing import Any

import datasets
import torch.utils.data
from PIL import Image

from automodel.errors import UsageError
from automodel.paths import is_local_path

HUB_ID = "naver-clova-ix/cord-v2"

DEFAULT_PROMPT = "Read this receipt. List each item with its count and price, then the total."

TARGET_FORMATS: tuple[str, ...] = ("json", "donut")

REQUIRED_COLUMNS: tuple[str, ...] = ("image", "ground_truth")

_LOCAL_HINT = (
    "a folder laid out like naver-clova-ix/cord-v2 (data/<split>-*.parquet with image and "
    "ground_truth columns), e.g. one written by automodel.datasets.vlm.make_receipts"
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


class CordV2Dataset(torch.utils.data.Dataset):
    """Map-style dataset of CORD-v2 receipts as user/assistant conversations.

    Rows stay in the Arrow table; an image is decoded only when its item is requested.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        prompt: str,
        target_format: str,
        image_size: int | None,
        source: str,
    ) -> None:
        # Separate single-column views share the Arrow table: reading a target never decodes
        # an image, and reading an image never parses the (large) ground_truth JSON twice.
        self._images = rows.select_columns(["image"])
        self._truths = rows.select_columns(["ground_truth"])
        self.prompt = prompt
        self.target_format = target_format
        self.image_size = image_size
        self.source = source

    def __len__(self) -> int:
        return self._truths.num_rows

    def _index(self, idx: Any) -> int:
        i = operator.index(idx)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {idx} out of range for {n} receipts in {self.source}")
        return i

    def gt_parse(self, idx: int) -> dict[str, Any]:
        """Return the ``gt_parse`` dict of one receipt, without decoding its image.

        Args:
            idx: row index.

        Returns:
            The receipt's ``gt_parse``.
        """
        i = self._index(idx)
        raw = self._truths[i]["ground_truth"]
        try:
            truth = json.loads(raw)
            parse = truth["gt_parse"]
        except (TypeError, ValueError, KeyError) as exc:
            raise UsageError(
                f"{self.source} row {i}: ground_truth is not JSON with a 'gt_parse' object "
                f"({type(exc).__name__}: {exc}); regenerate the data or fix that row."
            ) from None
        if not isinstance(parse, dict):
            raise UsageError(
                f"{self.source} row {i}: ground_truth['gt_parse'] is a "
                f"{type(parse).__name__}, expected an object; regenerate the data or fix that row."
            )
        return parse

    def target(self, idx: int) -> str:
        """Return the assistant answer for one receipt, without decoding its image.

        Args:
            idx: row index.

        Returns:
            ``gt_parse`` as JSON or Donut tokens, per ``target_format``.
        """
        parse = self.gt_parse(idx)
        return gt_parse_to_json(parse) if self.target_format == "json" else gt_parse_to_donut(parse)

    def image(self, idx: int) -> Image.Image:
        """Decode one receipt image as RGB, fitted within ``image_size`` when that is set.

        Args:
            idx: row index.

        Returns:
            The RGB image.
        """
        i = self._index(idx)
        image = self._images[i]["image"]
        if not isinstance(image, Image.Image):
            raise UsageError(f"{self.source} row {i}: the image column holds no decodable image.")
        image = image.convert("RGB")
        if self.image_size is not None:
            width, height = image.size
            scale = self.image_size / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            if size != image.size:
                image = image.resize(size, Image.Resampling.BICUBIC)
        return image

    def __getitem__(self, idx: int) -> dict[str, list[dict[str, Any]]]:
        return {
            "conversation": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": self.image(idx)},
                        {"type": "text", "text": self.prompt},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": self.target(idx)}]},
            ]
        }


def make_cord_v2_dataset(
    path_or_dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict = HUB_ID,
    split: str = "train",
    prompt: str = DEFAULT_PROMPT,
    target_format: str = "json",
    image_size: int | None = None,
    limit: int | None = None,
) -> CordV2Dataset:
    """Build the CORD-v2 receipt-parsing dataset as user/assistant conversations.

    Each item is ``{"conversation": [user, assistant]}``: the user turn holds the receipt image
    (RGB PIL) and ``prompt``; the assistant turn holds the receipt's ``gt_parse`` serialised per
    ``target_format``. Images are decoded lazily, one per ``__getitem__``.

    Args:
        path_or_dataset: hub id, local folder in the hub layout (``data/<split>-*.parquet``), or
            an already loaded ``datasets.Dataset``/``DatasetDict``.
        split: split to read (``train``, ``validation`` or ``test`` for CORD-v2); slicing such
            as ``train[:100]`` works as in ``datasets.load_dataset``.
        prompt: the user instruction that follows the image.
        target_format: ``"json"`` (compact JSON of ``gt_parse``) or ``"donut"`` (Donut tokens).
        image_size: when set, images are resized to fit within ``image_size`` x ``image_size``,
            keeping their aspect ratio.
        limit: keep only the first ``limit`` rows.

    Returns:
        A map-style ``torch.utils.data.Dataset``.

    Raises:
        UsageError: the path, split, columns or arguments are unusable, or the hub dataset cannot
            be loaded.
    """
    if target_format not in TARGET_FORMATS:
        raise UsageError(
            f"CORD-v2 target_format {target_format!r} is unknown; use one of "
            f"{', '.join(TARGET_FORMATS)}."
        )
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UsageError(f"CORD-v2 image_size={image_size!r} must be a positive integer or null.")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UsageError(f"CORD-v2 limit={limit!r} must be a positive integer or null.")

    rows, source = _load_split(path_or_dataset, split)
    missing = [column for column in REQUIRED_COLUMNS if column not in rows.column_names]
    if missing:
        raise UsageError(
            f"{source} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(rows.column_names)}); CORD-v2 data needs image and ground_truth columns."
        )
    rows = _decodable_images(rows, source)
    if limit is not None and limit < rows.num_rows:
        rows = rows.select(range(limit))
    return CordV2Dataset(rows, prompt, target_format, image_size, source)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _load_split(
    path_or_dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict, split: str
) -> tuple[datasets.Dataset, str]:
    """Load one split and name its source for messages; map every failure to a UsageError."""
    if isinstance(path_or_dataset, datasets.Dataset):
        return path_or_dataset, "the given CORD-v2 dataset"
    if isinstance(path_or_dataset, datasets.DatasetDict):
        if split not in path_or_dataset:
            raise UsageError(
                f"CORD-v2 split {split!r} not found in the given DatasetDict; available splits: "
                f"{', '.join(path_or_dataset)}."
            )
        return path_or_dataset[split], f"the given CORD-v2 dataset, split {split!r}"

    path = os.fspath(path_or_dataset)
    local = is_local_path(path)
    if local:
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise UsageError(
                f"CORD-v2 dataset folder {path!r} does not exist; pass {_LOCAL_HINT}, or the hub "
                f"id {HUB_ID!r}."
            )
    source = f"CORD-v2 dataset {path!r}, split {split!r}"
    try:
        rows = _load_rows(path, split, local)
    except ValueError as exc:
        if "Unknown split" not in str(exc):
            raise _load_error(path, local, exc) from exc
        available = _split_names(path, exc)
        raise UsageError(
            f"CORD-v2 split {split!r} not found in {path!r}; available splits: {available}. "
            "Set split to one of them."
        ) from None
    except Exception as exc:  # any loader failure is a data/network problem
        raise _load_error(path, local, exc) from exc
    if not isinstance(rows, datasets.Dataset):
        raise UsageError(f"{source} did not load as one table; name a single split.")
    return rows, source


def _load_rows(path: str, split: str, local: bool) -> datasets.Dataset:
    """``load_dataset`` for a hub id; for a folder, its packaged builder with absolute file paths.

    ``load_dataset(folder)`` keys its Arrow cache on the folder's name and its README config,
    not on the files: two different folders both named ``receipts`` would share one cache entry
    and the second would silently load the first one's rows. Resolving the folder's data files
    first and loading them through the file-type builder (parquet, json ...) keys the cache on
    the files themselves.
    """
    if not local:
        return datasets.load_dataset(path, split=split)
    builder = datasets.load_dataset_builder(path)
    files = dict(builder.config.data_files or {})
    return datasets.load_dataset(builder.name, data_files=files, split=split)


def _load_error(path: str, local: bool, exc: BaseException) -> UsageError:
    if local:
        return UsageError(
            f"Could not load CORD-v2 folder {path!r} ({_one_line(exc)}); it should be {_LOCAL_HINT}."
        )
    return UsageError(
        f"Could not load dataset {path!r} from the Hugging Face Hub ({_one_line(exc)}); check the "
        f"network and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE, or pass a local path to {_LOCAL_HINT}."
    )


def _split_names(path: str, exc: ValueError) -> str:
    """List the splits that exist, from the builder's data files or else from the error text."""
    try:
        builder = datasets.load_dataset_builder(path)
        names = list(builder.info.splits or {}) or list(builder.config.data_files or {})
    except Exception:  # noqa: BLE001 - only used to word a message
        names = []
    if not names:
        match = re.search(r"one of \[([^\]]*)\]", str(exc))
        names = [n.strip(" '\"") for n in match.group(1).split(",")] if match else []
    return ", ".join(names) if names else "(none found)"


def _decodable_images(rows: datasets.Dataset, source: str) -> datasets.Dataset:
    """Make the image column a decoding ``datasets.Image`` feature (decoded per row access)."""
    feature = rows.features["image"]
    if isinstance(feature, datasets.Image) and feature.decode:
        return rows
    try:
        return rows.cast_column("image", datasets.Image(decode=True))
    except Exception as exc:  # noqa: BLE001 - reported as a data problem
        raise UsageError(
            f"{source}: the image column ({feature}) cannot be read as images ({_one_line(exc)})."
        ) from None
