"""Tiny, randomly initialised twins of real vision-language model families.

A twin uses the real model, processor and chat template classes of its family, with sizes small
enough to fine-tune on a CPU in minutes. It is written as an ordinary Hugging Face folder, so every
code path that loads a hub checkpoint (``AutoModelForImageTextToText``, ``AutoProcessor``) loads it
unchanged, with no network access.

Twins are fixtures and demo material, not part of the training runtime: only the CLI's
``models make-tiny``, the examples' ``prepare:`` steps, tests and benchmarks import this package.

- ``corpus.py``: the built-in tokenizer training corpus;
- ``tokenizer.py``: byte-level BPE training, ``<unusedN>`` padding, the transformers wrapper;
- ``common.py``: seeded initialisation, generation config, saving, size checks, shared configs;
- one module per family (``gemma3``, ``gemma4``, ``paligemma``, ``qwen_vl``, ``qwen3_vl``, ``qwen3_5``,
  ``idefics3``, ``llava``, ``internvl``, ``lfm2_vl``, ``mistral3``): its configs, special tokens and chat template. A new family registers its builder
  in ``TWIN_FAMILIES`` (and a hub template it carries in ``TWIN_TEMPLATES``);
- ``templates/``: hub chat templates, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from automodel import artifacts
from automodel.common import parse_dtype
from automodel.errors import UsageError
from automodel.twins import gemma3, idefics3, llava, qwen_vl
from automodel.twins.common import HubTemplate, default_dtype, draw_device
from automodel.twins.gemma3 import build_gemma3
from automodel.twins.gemma4 import CHAT_TEMPLATE as GEMMA4_TEMPLATE
from automodel.twins.gemma4 import build_gemma4
from automodel.twins.idefics3 import build_idefics3, build_smolvlm
from automodel.twins.internvl import CHAT_TEMPLATE as INTERNVL_TEMPLATE
from automodel.twins.internvl import build_internvl
from automodel.twins.lfm2_vl import CHAT_TEMPLATE as LFM2_VL_TEMPLATE
from automodel.twins.lfm2_vl import build_lfm2_vl
from automodel.twins.llava import build_llava, build_llava_siglip
from automodel.twins.mistral3 import CHAT_TEMPLATE as MISTRAL3_TEMPLATE
from automodel.twins.mistral3 import build_mistral3
from automodel.twins.paligemma import build_paligemma
from automodel.twins.qwen3_5 import CHAT_TEMPLATE as QWEN3_5_TEMPLATE
from automodel.twins.qwen3_5 import build_qwen3_5
from automodel.twins.qwen3_vl import CHAT_TEMPLATE as QWEN3_VL_TEMPLATE
from automodel.twins.qwen3_vl import build_qwen3_vl
from automodel.twins.qwen_vl import build_qwen2_5_vl, build_qwen2_vl

__all__ = ["TWIN_FAMILIES", "TWIN_TEMPLATES", "make_tiny"]

# family name -> builder(out_dir, seed, **overrides), which writes the twin into out_dir.
TWIN_FAMILIES: dict[str, Callable[..., None]] = {
    "gemma3": build_gemma3,
    "gemma4": build_gemma4,
    "paligemma": build_paligemma,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "qwen3_5": build_qwen3_5,
    "smolvlm": build_smolvlm,
    "idefics3": build_idefics3,
    "llava": build_llava,
    "llava_siglip": build_llava_siglip,
    "internvl": build_internvl,
    "lfm2_vl": build_lfm2_vl,
    "mistral3": build_mistral3,
}

# family name -> the hub chat template its twin carries verbatim (every family with a chat
# template; PaliGemma, a prefix-LM, has none).
TWIN_TEMPLATES: dict[str, HubTemplate] = {
    "gemma3": gemma3.CHAT_TEMPLATE,
    "qwen2_vl": qwen_vl.CHAT_TEMPLATE,
    "qwen2_5_vl": qwen_vl.CHAT_TEMPLATE,
    "smolvlm": idefics3.SMOLVLM_CHAT_TEMPLATE,
    "idefics3": idefics3.IDEFICS3_CHAT_TEMPLATE,
    "llava": llava.CHAT_TEMPLATE,
    "llava_siglip": llava.CHAT_TEMPLATE,
    "qwen3_vl": QWEN3_VL_TEMPLATE,
    "qwen3_5": QWEN3_5_TEMPLATE,
    "gemma4": GEMMA4_TEMPLATE,
    "internvl": INTERNVL_TEMPLATE,
    "lfm2_vl": LFM2_VL_TEMPLATE,
    "mistral3": MISTRAL3_TEMPLATE,
}


def make_tiny(
    family: str,
    out_dir: str | Path,
    seed: int = 0,
    reuse: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    **overrides: Any,
) -> Path:
    """Write a tiny, randomly initialised twin of a real VLM family as a Hugging Face folder.

    Args:
        family: One of `TWIN_FAMILIES` (e.g. ``"gemma3"``).
        out_dir: Folder to write into; created if needed, existing files of the same names are
            overwritten.
        seed: Seed for the random weights. The same seed gives byte-identical files.
        reuse: Return ``out_dir`` untouched when it already holds a twin built with the same
            family, seed, dtype and overrides.
        dtype: The weights' dtype (``float32``, ``bfloat16``, ``float16``); the weights are
            created in it, never as a float32 copy first.
        device: Where the weights are drawn: ``cpu`` (the same bytes on any machine) or a CUDA
            device (a 4B model in seconds rather than minutes; bytes from the GPU's generator).
        **overrides: Size settings replacing the family's defaults (e.g. ``hidden_size=128``,
            ``num_hidden_layers=2``, ``image_size=64``, ``vocab_size=1024``).

    Returns:
        The folder, loadable with ``AutoModelForImageTextToText.from_pretrained`` and
        ``AutoProcessor.from_pretrained``.
    """
    if family not in TWIN_FAMILIES:
        raise UsageError(f"unknown tiny model family {family!r}; known: {', '.join(TWIN_FAMILIES)}")
    out = Path(out_dir)
    torch_dtype = parse_dtype(dtype, "dtype")
    params = {"family": family, "seed": seed, "code": artifacts.code_version(__name__), **overrides}
    if torch_dtype != torch.float32:  # recorded only when it is not the default
        params["dtype"] = str(torch_dtype).removeprefix("torch.")
    if torch.device(device).type != "cpu":  # recorded only when it is not the default
        params["device"] = torch.device(device).type
    if reuse and artifacts.is_built(out, "tiny-model", params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with default_dtype(torch_dtype), draw_device(device):
        TWIN_FAMILIES[family](out, seed, **overrides)
    artifacts.mark_built(out, "tiny-model", params)
    return out
