"""The sums behind one training log line: loss, tokens, time, over the steps since the last."""

from __future__ import annotations

import math
import time

import torch

from automodel.distributed.env import all_reduce_sum


class LogWindow:
    """Sums over the steps since the last log line.

    The loss sum stays a tensor (no host sync per step); its part is saved with every
    checkpoint (``state_dict``), so a resumed run's first line averages the same steps as an
    uninterrupted run's.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), device=self.device)
        self.loss, self.steps, self.tokens = zero, 0, zero.clone()
        self.start_clock()

    def start_clock(self) -> None:
        self.started = time.perf_counter()

    def add_tokens(self, attention_mask: torch.Tensor) -> None:
        self.tokens += attention_mask.sum()

    def add_step(self, loss: torch.Tensor) -> None:
        """Counts an applied update (a skipped step counts only its tokens)."""
        self.loss += loss
        self.steps += 1

    def close(self, images: int) -> dict[str, float]:
        """The window's mean loss and the throughput of all ranks (every rank must call this),
        then a new window. ``seconds`` is the window's wall time."""
        seconds = time.perf_counter() - self.started
        tokens = all_reduce_sum(self.tokens.float())
        images = all_reduce_sum(torch.tensor(float(images), device=self.device))
        out = {
            "loss": float(self.loss) / self.steps if self.steps else math.nan,
            "tokens_per_s": float(tokens) / seconds,
            "images_per_s": float(images) / seconds,
            "seconds": seconds,
        }
        self.reset()
        return out

    def state_dict(self) -> dict:
        return {"loss": self.loss.cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss = state["loss"].to(self.device)
        self.steps = state["steps"]
