"""fp32 attention under bf16 / fp16 autocast on a CPU (``precision.fp32_attention_on_cpu``).

torch's CPU kernels for scaled-dot-product attention are slower in bf16 than in fp32 (measured
with torch 2.14 on an AMX CPU, causal attention over 6 x 163 tokens, 4 heads of 64: 16-25 ms
forward and backward in bf16 against 7-8 ms in fp32), while the matrix products around them run
several times faster in bf16. With the switch on, a marked model's ``sdpa`` attention takes its
query, key and value in fp32 and hands its output back in the autocast dtype: the rest of the
step stays in bf16, and the attention itself is computed at least as precisely as before.

transformers looks the ``sdpa`` function up in its ``AttentionInterface`` at every forward, so
the wrapper is registered there once; it acts only on modules of a model marked here.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

_MARK = "_automodel_fp32_attention"
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    if not (
        getattr(module, _MARK, False)
        and query.device.type == "cpu"
        and query.dtype in _LOW_PRECISION
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(query.dtype), weights


def fp32_attention_on_cpu(model: torch.nn.Module, enabled: bool = True) -> None:
    """Marks every module of ``model`` so that its CPU ``sdpa`` attention runs in fp32 (or
    unmarks it). Attention already in fp32, on another device or not ``sdpa`` is unchanged."""
    if AttentionInterface._global_mapping.get("sdpa") is not _sdpa:
        AttentionInterface.register("sdpa", _sdpa)
    for module in model.modules():
        setattr(module, _MARK, enabled)


def runs_fp32_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` is marked to run its CPU ``sdpa`` attention in fp32 under autocast."""
    return bool(getattr(model, _MARK, False))
