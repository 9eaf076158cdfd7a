"""Skipping optimizer steps whose loss or gradient norm is not finite."""

from __future__ import annotations

import torch


class NonFiniteGuard:
    """Decides whether a step's update is applied, and when too many were skipped in a row.

    A skipped step still counts toward ``max_steps`` (its data is consumed), but neither the
    optimizer nor the learning-rate schedule moves.

    Args:
        max_consecutive: this many non-finite steps in a row stop the run.
    """

    def __init__(self, max_consecutive: int = 5):
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when the step's update may be applied; counts the step otherwise.

        One host synchronisation per step: the sum is non-finite when either value is.
        """
        finite = bool(torch.isfinite(loss.detach().float() + grad_norm.detach().float()))
        if finite:
            self.consecutive = 0
        else:
            self.skipped_steps += 1
            self.consecutive += 1
        return finite

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state["skipped_steps"]
        self.consecutive = state["consecutive"]
