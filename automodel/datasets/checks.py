"""Bad samples: found before the first step, skipped or stopped on by policy, never a crash.

``screen_dataset`` runs at setup. It scans every sample cheaply (``dataset.check(i)``: the record
parses, has a reply, its images exist and their headers open) and applies the policy:

- ``on_bad_sample: error`` (the default): any bad sample stops the run before its first step,
  naming ``file:line`` (or the row) and the reason.
- ``on_bad_sample: skip``: bad samples leave the index, are counted, logged and written to
  ``<checkpoint_dir>/bad_samples.<section>.jsonl``; a share above ``max_bad_fraction`` still
  stops the run (a wrong image folder should not train on nothing).

What only a full decode reveals (a truncated JPEG body) is caught by ``ScreenedDataset`` in the
DataLoader worker: the sample is reported loudly, appended to the same file, and the next good
sample is returned in its place, so a batch never has a hole and the run never crashes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.utils.data

from automodel.config.sections import DataCheckConfig
from automodel.errors import UsageError

# Consecutive undecodable samples after which the data is considered broken, not noisy.
MAX_REPLACEMENTS = 64
SHOWN = 20


@dataclass
class BadSample:
    """One unusable sample: which dataset section, where it lives, and why."""

    dataset: str
    where: str
    reason: str
    stage: str = "scan"


def sample_location(dataset: Any, idx: int, name: str) -> str:
    """``file:line`` (or row) of a sample when the dataset knows it, else ``<name> index i``."""
    locate = getattr(dataset, "location", None)
    return locate(idx) if callable(locate) else f"{name} index {idx}"


def scan_dataset(dataset: Any, name: str) -> tuple[list[int], list[BadSample]]:
    """Run the dataset's cheap per-sample check on every sample.

    Datasets without a ``check`` method (a custom ``_target_``) pass unscanned; the decode-time
    safety net of ``ScreenedDataset`` still covers them.

    Args:
        dataset: a builder's dataset (``automodel.datasets.vlm``) or any map-style dataset.
        name: the config section, for messages.

    Returns:
        The indices of the good samples and the bad samples found.
    """
    check = getattr(dataset, "check", None)
    if not callable(check):
        return list(range(len(dataset))), []
    seen: dict[str, str | None] = {}
    good, bad = [], []
    for i in range(len(dataset)):
        reason = check(i, seen)
        if reason is None:
            good.append(i)
        else:
            bad.append(BadSample(name, sample_location(dataset, i, name), reason))
    return good, bad


def allowed_bad(num_samples: int, policy: DataCheckConfig) -> int:
    """How many bad samples the policy tolerates in a dataset of ``num_samples``."""
    return 0 if policy.on_bad_sample == "error" else int(policy.max_bad_fraction * num_samples)


def screen_dataset(
    dataset: Any,
    name: str,
    out_dir: str | os.PathLike[str] | None = None,
    policy: DataCheckConfig | None = None,
) -> ScreenedDataset:
    """Scan a dataset before training and apply the bad-sample policy.

    Args:
        dataset: the built dataset.
        name: its config section (``dataset``, ``validation_dataset``).
        out_dir: the run's checkpoint folder; bad samples go to
            ``bad_samples.<name>.jsonl`` there.
        policy: the ``data_check`` section (None: its defaults): ``on_bad_sample`` (``error``: stop before the
            first step; or ``skip``) and ``max_bad_fraction`` (with ``skip``, the largest share
            of bad samples tolerated).

    Returns:
        The dataset restricted to its good samples, with the decode-time safety net.

    Raises:
        UsageError: bad samples the policy does not tolerate, or no usable sample at all.
    """
    policy = policy or DataCheckConfig()
    start = time.perf_counter()
    good, bad = scan_dataset(dataset, name)
    seconds = time.perf_counter() - start
    total = len(dataset)
    log_path = Path(out_dir) / f"bad_samples.{name}.jsonl" if out_dir is not None else None
    if log_path is not None and _is_rank0():
        _write_log(log_path, bad)
    _print(f"{name}: scanned {total} samples in {seconds:.1f}s, {len(bad)} unusable")
    if bad:
        for sample in bad[:SHOWN]:
            _print(f"  bad sample {sample.where}: {sample.reason}")
        if len(bad) > SHOWN:
            _print(
                f"  ... and {len(bad) - SHOWN} more" + (f" (all in {log_path})" if log_path else "")
            )
        first = f"first {bad[0].where}: {bad[0].reason}"
        listed = f"; all listed in {log_path}" if log_path else ""
        if policy.on_bad_sample == "error":
            raise UsageError(
                f"{name}: {len(bad)} of {total} samples are unusable ({first}){listed}; fix them, "
                "or set data_check.on_bad_sample=skip to train without them"
            )
        if len(bad) > allowed_bad(total, policy):
            raise UsageError(
                f"{name}: {len(bad)} of {total} samples are unusable, more than "
                f"data_check.max_bad_fraction={policy.max_bad_fraction} ({first}){listed}; fix "
                "the data (a wrong path or column?) or raise max_bad_fraction"
            )
        _print(f"{name}: skipping {len(bad)} of {total} samples (on_bad_sample: skip){listed}")
    if not good:
        raise UsageError(f"{name}: the dataset has no samples; check its path and split")
    return ScreenedDataset(dataset, good, name, log_path)


class ScreenedDataset(torch.utils.data.Dataset):
    """A dataset restricted to its good samples, replacing any that fail to decode.

    A sample whose decoding fails in a worker is reported on stderr, appended to the bad-sample
    file, and replaced by the next good one (deterministically: index + 1, + 2, ...).
    """

    def __init__(
        self, dataset: Any, good: list[int], name: str, log_path: Path | None = None
    ) -> None:
        self.dataset = dataset
        self.good = good
        self.name = name
        self.log_path = log_path
        self.failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.good)

    def location(self, idx: int) -> str:
        return sample_location(self.dataset, self.good[idx], self.name)

    def __getitem__(self, idx: int) -> Any:
        n = len(self.good)
        for step in range(min(n, MAX_REPLACEMENTS)):
            i = self.good[(idx + step) % n]
            try:
                return self.dataset[i]
            except Exception as exc:  # noqa: BLE001 - any failure of one sample skips it
                self._report(i, exc)
        raise UsageError(
            f"{self.name}: {min(n, MAX_REPLACEMENTS)} samples in a row from index {idx} failed "
            f"to decode (see the messages above); the data is broken, not noisy"
        )

    def _report(self, i: int, exc: Exception) -> None:
        if i in self.failed:
            return
        self.failed.add(i)
        reason = str(exc) if exc.__class__.__name__ == "BadSampleError" else repr(exc)
        sample = BadSample(self.name, sample_location(self.dataset, i, self.name), reason, "decode")
        print(
            f"WARNING: skipped {self.name} sample {sample.where}: {reason} (failed while "
            "decoding; replaced by the next good sample)",
            file=sys.stderr,
            flush=True,
        )
        if self.log_path is not None:
            # One short line per write in append mode: workers do not interleave their lines.
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(sample)) + "\n")


def _write_log(path: Path, bad: list[BadSample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(sample)) + "\n" for sample in bad)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _print(message: str) -> None:
    if _is_rank0():
        print(message, flush=True)
