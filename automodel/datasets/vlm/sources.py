"""Where records come from: JSON Lines, JSON arrays, and anything Hugging Face ``datasets`` reads.

Every builder reads its rows through ``open_records``, which returns a ``RecordSource``: a
numbered list of raw records (plain dicts, images still undecoded) that can name each record's
place (``file.jsonl:17`` or ``source row 5``) for error messages.

- A ``.jsonl`` file (or a folder with ``<split>.jsonl``) is indexed by byte offsets only; a line
  is parsed when its sample is requested, so a 100k-line file costs a few hundred KB of memory
  and a malformed line is one bad sample, not a failed load.
- A ``.json`` file holding one array is parsed once (that is what the format allows).
- Hub ids, parquet / arrow / csv files, ``imagefolder`` folders with ``metadata.jsonl``,
  ``save_to_disk`` folders and CORD-v2-style ``data/<split>-*.parquet`` folders load through
  ``datasets``; rows stay memory-mapped in Arrow with their images undecoded.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import datasets
import numpy as np

from automodel.errors import UsageError
from automodel.paths import is_local_path

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Files loaded through the packaged builder of the same name.
PACKAGED_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}
HOLDOUT_SPLITS = ("train", "validation")


class BadSampleError(Exception):
    """A record that cannot become a training sample; the message is the reason, one line."""


class RecordSource:
    """A numbered list of raw records.

    Attributes:
        name: the source for messages (a path, a hub id, "the given dataset").
        base_dir: the folder relative image paths resolve against, or ``None``.
    """

    name: str
    base_dir: str | None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> dict[str, Any]:
        """Record ``i`` as a dict; raises ``BadSampleError`` when it cannot be parsed."""
        raise NotImplementedError

    def location(self, i: int) -> str:
        """Where record ``i`` lives, e.g. ``data/train.jsonl:17``."""
        raise NotImplementedError

    def fields(self) -> list[str] | None:
        """The column names when the source has a fixed schema (Arrow), else ``None``."""
        return None


class JsonLinesSource(RecordSource):
    """A JSON Lines file, indexed by byte offsets; each line is parsed on access."""

    def __init__(self, path: str) -> None:
        self.name = path
        self.base_dir = os.path.dirname(os.path.abspath(path))
        offsets, ends, lines = [], [], []
        position = 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(position)
                    ends.append(position + len(line))
                    lines.append(number)
                position += len(line)
        # numpy arrays, not lists of ints: no per-item Python objects for DataLoader workers to
        # copy-on-touch through refcount updates.
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._ends = np.asarray(ends, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        self._fd: int | None = None
        self._fd_pid = -1

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_fd_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)

    def read(self, i: int) -> dict[str, Any]:
        # One descriptor per process, read with pread: no shared file offset between workers.
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.name, os.O_RDONLY), os.getpid()
        start = int(self._offsets[i])
        raw = os.pread(self._fd, int(self._ends[i]) - start, start)
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as exc:
            raise BadSampleError(
                f"the line is not UTF-8 text (byte {raw[exc.start]:#04x} at {exc.start}); save "
                "the file as UTF-8"
            ) from None
        except ValueError as exc:
            raise BadSampleError(f"malformed JSON ({exc})") from None
        if not isinstance(record, dict):
            raise BadSampleError(f"the line is a JSON {type(record).__name__}, not an object")
        return record

    def location(self, i: int) -> str:
        return f"{self.name}:{int(self._lines[i])}"


class JsonArraySource(RecordSource):
    """A JSON file holding one array of records (LLaVA's format), parsed once."""

    def __init__(self, path: str) -> None:
        self.name = path
        self.base_dir = os.path.dirname(os.path.abspath(path))
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start}); save it as UTF-8"
            ) from None
        except ValueError as exc:
            raise UsageError(
                f"{path} is not valid JSON ({exc}); fix the file, or write one record per line "
                "as .jsonl so a bad record only skips itself."
            ) from None
        if not isinstance(records, list):
            raise UsageError(
                f"{path} holds a JSON {type(records).__name__}; expected an array of records "
                "(or use .jsonl with one record per line)."
            )
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def read(self, i: int) -> dict[str, Any]:
        record = self._records[i]
        if not isinstance(record, dict):
            raise BadSampleError(f"the record is a JSON {type(record).__name__}, not an object")
        return record

    def location(self, i: int) -> str:
        return f"{self.name}[{i}]"


class ArrowSource(RecordSource):
    """Rows of a ``datasets.Dataset`` with every image column left undecoded."""

    def __init__(self, rows: datasets.Dataset, name: str, base_dir: str | None) -> None:
        self.rows = undecoded(rows)
        self.name = name
        self.base_dir = base_dir

    def __len__(self) -> int:
        return self.rows.num_rows

    def read(self, i: int) -> dict[str, Any]:
        return self.rows[int(i)]

    def location(self, i: int) -> str:
        return f"{self.name} row {int(i)}"

    def fields(self) -> list[str]:
        return list(self.rows.column_names)


def undecoded(rows: datasets.Dataset) -> datasets.Dataset:
    """The same rows with ``Image`` features (also nested in lists) set to ``decode=False``."""

    def no_decode(feature: Any) -> Any:
        if isinstance(feature, datasets.Image) and feature.decode:
            return datasets.Image(decode=False)
        return feature

    for name, feature in rows.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            # A top-level Image column only swaps its feature: no pass over the data.
            rows = rows.cast_column(name, datasets.Image(decode=False))
    features = rows.features
    nested = datasets.Features(
        {k: datasets.features.features._visit(v, no_decode) for k, v in features.items()}
    )
    return rows if nested == features else rows.cast(nested)


def open_records(
    path_or_dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict,
    split: str,
    what: str,
    holdout: bool = False,
) -> RecordSource:
    """Open the records of one split of a dataset, whatever its format.

    Args:
        path_or_dataset: a hub id; a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.arrow`` /
            ``.csv`` file; a folder (``<split>.jsonl``, ``data/<split>-*.parquet``, an
            ``imagefolder`` with ``metadata.jsonl``, or a ``save_to_disk`` copy); or a loaded
            ``datasets.Dataset`` / ``DatasetDict``.
        split: the split to read. A single file has no splits: it is read whole as ``train``.
        what: the builder's name for messages, e.g. ``"image-text dataset"``.
        holdout: the caller splits the records itself (``val_fraction``): read ``train``.

    Returns:
        The ``RecordSource``.

    Raises:
        UsageError: the path, split or file cannot be read.
    """
    read_split = "train" if holdout else split
    if isinstance(path_or_dataset, datasets.Dataset):
        return ArrowSource(path_or_dataset, f"the given {what}", None)
    if isinstance(path_or_dataset, datasets.DatasetDict):
        if read_split not in path_or_dataset:
            raise UsageError(
                f"{what} split {read_split!r} not found in the given DatasetDict; available "
                f"splits: {', '.join(path_or_dataset)}."
            )
        return ArrowSource(path_or_dataset[read_split], f"the given {what} [{read_split}]", None)

    path = os.fspath(path_or_dataset)
    if not is_local_path(path):
        rows = _load_hub(path, read_split, what)
        return ArrowSource(rows, f"{path} [{read_split}]", None)
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return _file_source(path, read_split, what)
    return _folder_source(path, read_split, what)


def _file_source(path: str, read_split: str, what: str) -> RecordSource:
    """One local file, read whole as ``train`` (JSON lines, a JSON array, parquet, arrow, csv)."""
    _check_single_file_split(path, read_split, what)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in JSONL_SUFFIXES:
        return JsonLinesSource(path)
    if suffix == ".json":
        return _json_source(path)
    if suffix in PACKAGED_SUFFIXES:
        rows = _load_packaged(PACKAGED_SUFFIXES[suffix], {"train": path}, "train", path, what)
        return ArrowSource(rows, path, os.path.dirname(os.path.abspath(path)))
    raise UsageError(
        f"{what} file {path!r} has an unknown type; use .jsonl, .json, .parquet, .arrow or "
        ".csv, or a folder."
    )


def _folder_source(path: str, read_split: str, what: str) -> RecordSource:
    """A local folder: ``<split>.jsonl`` / ``.json``, a ``save_to_disk`` copy, or parquet /
    imagefolder files of the split."""
    if not os.path.isdir(path):
        raise UsageError(f"{what} path {path!r} does not exist; check the path in the config.")
    for suffix in (*JSONL_SUFFIXES, ".json"):
        candidate = os.path.join(path, read_split + suffix)
        if os.path.isfile(candidate):
            return JsonLinesSource(candidate) if suffix != ".json" else _json_source(candidate)
    if _is_saved_to_disk(path):
        rows = _load_from_disk(path, read_split, what)
        return ArrowSource(rows, f"{path} [{read_split}]", os.path.abspath(path))
    rows, base_dir = load_folder_split(path, read_split, what)
    return ArrowSource(rows, f"{path} [{read_split}]", base_dir)


def holdout_indices(n: int, split: str, val_fraction: float, seed: int, what: str) -> np.ndarray:
    """Record indices of one side of a seeded train/validation partition.

    The partition depends only on ``n``, ``val_fraction`` and ``seed``, so a ``dataset`` and a
    ``validation_dataset`` built with the same three never share a record.

    Args:
        n: number of records.
        split: ``"train"`` (the rest) or ``"validation"`` (the held-out share).
        val_fraction: share held out for validation, in (0, 1).
        seed: the permutation's seed.
        what: the builder's name for messages.

    Returns:
        Sorted record indices (file order is kept within each side).
    """
    if split not in HOLDOUT_SPLITS:
        raise UsageError(
            f"{what}: with val_fraction, split must be 'train' or 'validation', got {split!r}."
        )
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise UsageError(f"{what}: val_fraction={val_fraction!r} must be a number in (0, 1).")
    if n < 2:
        raise UsageError(f"{what}: {n} record(s) cannot be split into train and validation.")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    chosen = order[:n_val] if split == "validation" else order[n_val:]
    return np.sort(chosen)


def load_folder_split(path: str, split: str, what: str) -> tuple[datasets.Dataset, str]:
    """Load one split of a local folder through its packaged builder with absolute data files.

    ``load_dataset(folder)`` keys its Arrow cache on the folder's name and its README config,
    not on the files: two different folders both named ``receipts`` would share one cache entry
    and the second would silently load the first one's rows. Resolving the folder's data files
    first and loading them through the file-type builder (parquet, json, imagefolder ...) keys
    the cache on the files themselves.

    Returns:
        The rows and the folder relative image paths resolve against (the data files' folder
        when they share one, else ``path``).
    """
    try:
        builder = datasets.load_dataset_builder(path)
        files = dict(builder.config.data_files or {})
        rows = datasets.load_dataset(builder.name, data_files=files, split=split)
    except ValueError as exc:
        if "Unknown split" not in str(exc):
            raise _load_error(path, True, what, exc) from exc
        raise UsageError(
            f"{what} split {split!r} not found in {path!r}; available splits: "
            f"{_split_names(path, exc)}. Set split to one of them."
        ) from None
    except UsageError:
        raise
    except Exception as exc:  # any loader failure is a data problem
        raise _load_error(path, True, what, exc) from exc
    if not isinstance(rows, datasets.Dataset):
        raise UsageError(f"{what} {path!r} [{split}] did not load as one table; name one split.")
    split_files = [str(f) for f in files.get(split, [])] if split in files else []
    folders = {os.path.dirname(f) for f in split_files}
    base_dir = folders.pop() if len(folders) == 1 else os.path.abspath(path)
    return rows, base_dir


def load_hub_split(path: str, split: str, what: str) -> datasets.Dataset:
    """``datasets.load_dataset(hub_id, split=...)`` with every failure worded as a UsageError."""
    return _load_hub(path, split, what)


def one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line, at most ~300 characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _check_single_file_split(path: str, split: str, what: str) -> None:
    if split != "train":
        raise UsageError(
            f"{what} {path!r} is one file, read whole as split 'train', so it has no {split!r} "
            "split: point validation_dataset at its own file, or set val_fraction and seed "
            "(the same on dataset and validation_dataset) to hold out a seeded share."
        )


def _json_source(path: str) -> RecordSource:
    """``.json``: an array is LLaVA's layout; anything else is read as JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return JsonArraySource(path) if head.startswith(b"[") else JsonLinesSource(path)


def _is_saved_to_disk(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")
    )


def _load_from_disk(path: str, split: str, what: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:
        raise _load_error(path, True, what, exc) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UsageError(
                f"{what} split {split!r} not found in {path!r}; available splits: "
                f"{', '.join(loaded)}. Set split to one of them."
            )
        return loaded[split]
    _check_single_file_split(path, split, what)
    return loaded


def _load_packaged(
    builder: str, files: dict[str, str], split: str, path: str, what: str
) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files=files, split=split)
    except Exception as exc:
        raise _load_error(path, True, what, exc) from exc


def _load_hub(path: str, split: str, what: str) -> datasets.Dataset:
    try:
        rows = datasets.load_dataset(path, split=split)
    except ValueError as exc:
        if "Unknown split" in str(exc):
            raise UsageError(
                f"{what} split {split!r} not found in {path!r}; available splits: "
                f"{_split_names(path, exc)}. Set split to one of them."
            ) from None
        raise _load_error(path, False, what, exc) from exc
    except Exception as exc:  # network or hub failure
        raise _load_error(path, False, what, exc) from exc
    if not isinstance(rows, datasets.Dataset):
        raise UsageError(f"{what} {path!r} [{split}] did not load as one table; name one split.")
    return rows


def _load_error(path: str, local: bool, what: str, exc: BaseException) -> UsageError:
    if local:
        return UsageError(f"Could not load {what} {path!r} ({one_line(exc)}).")
    return UsageError(
        f"Could not load dataset {path!r} from the Hugging Face Hub ({one_line(exc)}); check the "
        "network and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE, or pass a local path."
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
