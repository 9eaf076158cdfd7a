"""What a run reports: a progress bar, a console line per log step, JSON lines on disk, and the
metrics sinks (TensorBoard, W&B, MLflow)."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from automodel.common import is_rank_zero

TRAINING_LOG = "training.jsonl"
VALIDATION_LOG = "validation.jsonl"
# A log window that spent this share of its time waiting for batches gets a one-time hint.
DATA_WAIT_HINT_PCT = 20.0


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 2**20


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (a killed writer) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: str | Path, last_step: int) -> None:
    """Keeps the records up to ``last_step``: a resumed run rewrites what came after.

    ``last_step`` 0 (a fresh run) removes the file.
    """
    path = Path(path)
    if not last_step:
        path.unlink(missing_ok=True)
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


class ProgressBar:
    """A tqdm bar on a terminal; nothing otherwise (logs then hold only the plain lines).

    Args:
        total: steps in the run.
        initial: the step a resumed run starts from.
        stream: where the bar and the lines go (stdout by default).
    """

    def __init__(self, total: int, initial: int = 0, stream: IO[str] | None = None):
        self.stream = stream or sys.stdout
        self.bar = None
        if is_rank_zero() and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True
            )

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the bar, e.g. the latest loss."""
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def write(self, line: str) -> None:
        """A line printed above the bar (or plainly, without one)."""
        if not is_rank_zero():
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    """Writes ``training.jsonl`` / ``validation.jsonl`` under ``out_dir``, prints a line per log
    step above the progress bar, and forwards every record to the sinks.

    Args:
        out_dir: the run's checkpoint directory.
        total_steps: for the ``step/total`` display and the ETA.
        start_step: the step a resumed run continues from (0 for a fresh run); records after it
            are removed from the JSON lines, so a resumed run neither duplicates nor loses steps.
        sinks: objects with ``log(metrics, step)`` and ``close()``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        sinks: Sequence[Any] = (),
    ):
        self.out_dir = Path(out_dir)
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.start_step = start_step
        self.sinks = list(sinks)
        if is_rank_zero():
            truncate_log(self.out_dir / TRAINING_LOG, start_step)
            truncate_log(self.out_dir / VALIDATION_LOG, start_step)
        self.progress = ProgressBar(total_steps, start_step)

    def _append(self, name: str, record: dict) -> None:
        if is_rank_zero():
            with open(self.out_dir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _forward(self, prefix: str, metrics: dict, step: int) -> None:
        if is_rank_zero():
            scalars = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
            for sink in self.sinks:
                sink.log(scalars, step)

    def advance(self) -> None:
        """Moves the progress bar one step."""
        self.progress.update(1)

    def log_train(self, step: int, metrics: dict) -> None:
        self._append(TRAINING_LOG, {"step": step, **metrics})
        self._forward("train", metrics, step)
        elapsed = time.perf_counter() - self.start
        done = max(1, step - self.start_step)
        eta = elapsed / done * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
        for part in ("language_loss", "vision_loss"):  # present when vision_loss is weighted
            if part in metrics:
                parts.append(f"{part} {metrics[part]:.4f}")
        parts.append(f"lr {metrics['lr']:.2e}")
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
        parts.append(f"tokens/s {metrics['tokens_per_s']:.0f}")
        parts.append(f"images/s {metrics['images_per_s']:.1f}")
        if "data_wait_pct" in metrics:
            parts.append(f"data {metrics['data_wait_pct']:.0f}%")
        parts.append(f"mem {metrics['peak_memory_gb']:.2f}GB")
        parts.append(f"eta {_duration(eta)}")
        if metrics.get("skipped_steps"):
            parts.append(f"skipped {metrics['skipped_steps']}")
        self.progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        self.progress.write(" | ".join(parts))

    def log_validation(self, step: int, metrics: dict) -> None:
        self._append(VALIDATION_LOG, {"step": step, **metrics})
        self._forward("validation", metrics, step)
        self.progress.write(
            f"validation step {step}: val_loss {metrics['val_loss']:.4f} "
            f"({metrics['val_tokens']} label tokens)"
        )

    def write(self, line: str) -> None:
        """A message printed above the progress bar."""
        self.progress.write(line)

    def close(self) -> None:
        self.progress.close()
        for sink in self.sinks:
            sink.close()


class DataWait:
    """Time the training loop spends waiting for its batches: per log window and in total.

    Args:
        workers: the loader's ``num_workers``, named in the hint.
        hint_pct: a window that waited at least this share of its time gets a hint, once a run.
    """

    def __init__(self, workers: int, hint_pct: float = DATA_WAIT_HINT_PCT):
        self.workers, self.hint_pct = workers, hint_pct
        self.total = self.window = 0.0
        self.hinted = False

    def take(self, batches: Iterator, n: int) -> list:
        """The next ``n`` batches of ``batches``, the time spent getting them counted."""
        start = time.perf_counter()
        taken = [next(batches) for _ in range(n)]
        waited = time.perf_counter() - start
        self.total += waited
        self.window += waited
        return taken

    def end_window(self, seconds: float) -> tuple[float, str | None]:
        """The window's waiting share in percent, and the hint when it is due; opens a new window.

        Args:
            seconds: the window's wall time.
        """
        percent = 100 * min(1.0, self.window / seconds)
        self.window = 0.0
        if percent < self.hint_pct or self.hinted:
            return percent, None
        self.hinted = True
        return percent, (
            f"the training loop waited for data {percent:.0f}% of the time since the last log "
            f"line: more dataloader.num_workers (now {self.workers}) would prepare batches in "
            "parallel"
        )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
