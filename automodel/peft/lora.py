"""LoRA through Hugging Face PEFT: choosing target layers by role, saving, merging.

The default targets every linear layer of the language model and nothing else (the family
registry's ``lora_targets``): a bare pattern such as ``q_proj`` also matches the attention layers
of SigLIP, CLIP and Idefics3 vision towers, so targets are resolved here to exact module names
before PEFT sees them.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from automodel.common import is_peft_model
from automodel.errors import UsageError
from automodel.models.families import family_of


@dataclass
class LoraConfig:
    """The ``peft`` section.

    Args:
        r: adapter rank (``dim`` in NeMo AutoModel configs).
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)``
            with ``use_rslora``).
        dropout: dropout on the adapter input.
        target_modules: globs matched against full module names (``"*.q_proj"``), or one string
            read as a regular expression that must match the whole name. Default: every
            linear layer of the language model.
        exclude_modules: globs or one regex, removed from the targets.
        match_all_linear: target every linear layer of the model (minus exclusions and the
            default exclusions: vision tower, projector, ``lm_head``).
        use_dora: weight-decomposed LoRA.
        use_rslora: rank-stabilised scaling.
        qlora: load the base in 4 bit through bitsandbytes (CUDA only).
        dim: NeMo AutoModel's name for ``r``; when given it wins.
        use_triton: accepted for NeMo AutoModel configs; PEFT's own kernels are used.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    match_all_linear: bool = False
    use_dora: bool = False
    use_rslora: bool = False
    qlora: bool = False
    dim: int | None = None
    use_triton: bool = False

    def __post_init__(self) -> None:
        if self.dim is not None:
            self.r = self.dim
        if self.r < 1:
            raise UsageError(f"peft.r={self.r}: the rank must be at least 1")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"peft.dropout={self.dropout}: use a value in [0, 1)")


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def resolve_target_modules(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the linear layers LoRA adapts.

    Raises:
        UsageError: the patterns match no linear layer (the message lists some that exist).
    """
    family = family_of(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if cfg.target_modules:
        chosen = [n for n in linear if _matches(n, cfg.target_modules)]
    elif cfg.match_all_linear:
        chosen = [n for n in linear if not _matches(n, list(family.lora_exclude))]
    else:
        chosen = [
            n
            for n in linear
            if _matches(n, list(family.lora_targets)) and not _matches(n, ["*lm_head*"])
        ]
    chosen = [n for n in chosen if not _matches(n, cfg.exclude_modules)]
    if not chosen:
        examples = ", ".join(linear[:4] + (["..."] if len(linear) > 4 else []))
        raise UsageError(
            f"peft.target_modules={cfg.target_modules!r} matches no linear layer "
            f"(names look like: {examples}); use globs such as '*.q_proj' or one regex"
        )
    return chosen


def apply_lora(model: nn.Module, cfg: LoraConfig):
    """Wraps ``model`` in a PEFT ``PeftModel`` with LoRA on the resolved targets.

    Every base parameter is frozen; only the adapters train.
    """
    import peft

    if cfg.qlora and not torch.cuda.is_available():
        raise UsageError(
            "peft.qlora needs a CUDA GPU (4-bit weights through bitsandbytes); "
            "set peft.qlora=false on this machine"
        )
    targets = resolve_target_modules(model, cfg)
    lora = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
    )
    return peft.get_peft_model(model, lora)


def merge(model: nn.Module) -> nn.Module:
    """Folds the adapters into the base weights and returns the plain transformers model."""
    return model.merge_and_unload() if is_peft_model(model) else model
