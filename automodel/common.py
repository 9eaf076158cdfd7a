"""What every layer shares: the label that means "no loss here", the per-token batch keys, the
model inside a PEFT wrapper, rank-0 printing and the one dtype parser.

This module imports nothing from automodel but ``errors``, so any layer may import it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from automodel.errors import UsageError

# Label of a position that adds nothing to the loss (prompt, image, padding tokens).
IGNORE_INDEX = -100

# The batch entries laid out per token ([B, T]): padded, truncated and packed together.
SEQUENCE_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "mm_token_type_ids",
    "assistant_masks",
    "labels",
)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper (``PeftModel``) around a transformers model."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if is_peft_model(model) else model


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so logs interleave correctly with subprocess output."""
    if is_rank_zero():
        print(*args, **kwargs, flush=True)


def parse_dtype(value: Any, key: str, allow_auto: bool = False) -> torch.dtype | str | None:
    """A config's dtype (``bfloat16``, ``bf16``, ``torch.float32``, a ``torch.dtype``...).

    Args:
        value: the configured value; None stays None.
        key: the config key, named in the error.
        allow_auto: whether ``"auto"`` (the checkpoint's own dtype) is a valid answer.

    Raises:
        UsageError: not a floating dtype this project trains in.
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    if allow_auto and value == "auto":
        return "auto"
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        choices = "bfloat16, float16, float32" + (" or auto" if allow_auto else "")
        raise UsageError(f"{key}: unknown dtype {value!r} (use {choices})")
    return _DTYPES[name]
