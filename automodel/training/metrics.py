"""What a run reports: a console line per log step and JSON lines on disk."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so logs interleave correctly with subprocess output."""
    if is_rank_zero():
        print(*args, **kwargs, flush=True)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 2**20


class MetricsLogger:
    """Writes ``training.jsonl`` / ``validation.jsonl`` under ``out_dir`` and prints a line.

    Args:
        out_dir: the run's checkpoint directory.
        total_steps: for the ``step/total`` display and the ETA.
    """

    def __init__(self, out_dir: str | Path, total_steps: int):
        self.out_dir = Path(out_dir)
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.start_step = 0

    def _append(self, name: str, record: dict) -> None:
        if is_rank_zero():
            with open(self.out_dir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_train(self, step: int, metrics: dict) -> None:
        self._append("training.jsonl", {"step": step, **metrics})
        elapsed = time.perf_counter() - self.start
        done = max(1, step - self.start_step)
        eta = elapsed / done * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
        parts.append(f"lr {metrics['lr']:.2e}")
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
        parts.append(f"tokens/s {metrics['tokens_per_s']:.0f}")
        parts.append(f"images/s {metrics['images_per_s']:.1f}")
        parts.append(f"mem {metrics['peak_memory_gb']:.2f}GB")
        parts.append(f"eta {_duration(eta)}")
        print0(" | ".join(parts))

    def log_validation(self, step: int, metrics: dict) -> None:
        self._append("validation.jsonl", {"step": step, **metrics})
        print0(
            f"validation step {step}: val_loss {metrics['val_loss']:.4f} "
            f"({metrics['val_tokens']} label tokens)"
        )


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
