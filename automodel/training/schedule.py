"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay."""

from __future__ import annotations

import math

import torch

from automodel.config.sections import LrSchedulerConfig


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    config: LrSchedulerConfig | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Builds the schedule for ``max_steps`` optimizer steps.

    Args:
        optimizer: its ``lr`` is the peak learning rate.
        max_steps: total optimizer steps.
        config: the ``lr_scheduler`` section (None: its defaults): ``lr_warmup_steps`` (steps of linear warmup from
            0, or a fraction (< 1) of ``max_steps``), ``lr_decay_style`` (``cosine``,
            ``linear`` or ``constant`` after warmup), ``min_lr`` (reached at ``max_steps``).
    """
    config = config or LrSchedulerConfig()
    lr_warmup_steps, lr_decay_style = config.lr_warmup_steps, config.lr_decay_style
    min_lr = config.min_lr
    warmup = int(lr_warmup_steps * max_steps) if 0 < lr_warmup_steps < 1 else int(lr_warmup_steps)
    peak = optimizer.param_groups[0]["lr"]
    floor = min_lr / peak if peak > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if lr_decay_style == "constant" or max_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if lr_decay_style == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
