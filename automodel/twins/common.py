"""What every twin builder shares: seeded initialisation, generation config, saving, sizes,
and the Llama decoder and SigLIP tower configs that several families use."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin
from transformers.utils import logging as hf_logging

from automodel.errors import UsageError
from automodel.twins.tokenizer import token_id


def generation_config(
    tokenizer: PreTrainedTokenizerFast, stop_tokens: list[str]
) -> GenerationConfig:
    """A greedy generation config that stops at any of `stop_tokens`.

    Args:
        tokenizer: The family's tokenizer (supplies bos and pad ids).
        stop_tokens: Tokens that end generation, e.g. the end-of-sequence and end-of-turn tokens
            (a model trained on chat replies ends them with end-of-turn).

    Returns:
        The generation config to attach to the model.
    """
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[token_id(tokenizer, token) for token in stop_tokens],
        pad_token_id=tokenizer.pad_token_id,
    )


# Where `init_model` draws the weights when not on the CPU (`draw_device` sets it;
# `make_tiny(device=...)` uses it).
_DRAW_DEVICE: ContextVar[torch.device | None] = ContextVar("draw_device", default=None)


def init_model(
    factory: Callable[[], PreTrainedModel],
    seed: int,
    after_init: Callable[[PreTrainedModel], None] | None = None,
) -> PreTrainedModel:
    """Build a model with weights drawn from `seed`, leaving the global RNG as it was.

    Args:
        factory: Builds the model from its config (its weights are initialised while it runs).
        seed: Seed for all random weights.
        after_init: Optional extra initialisation, run under the same seeded RNG.

    Returns:
        The model in eval mode, in torch's default dtype (``make_tiny`` sets it; see
        `default_dtype`), on the CPU unless `draw_device` chose a CUDA device.
    """
    device = _DRAW_DEVICE.get() or torch.device("cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        # Only the CPU's generator and the drawing device's: torch.manual_seed would also
        # reseed (and leave changed) the other devices' generators, which fork_rng does not
        # restore.
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        # Initialise on that device's generator (the one forked and seeded here) even when the
        # caller set another default device, so the weights depend on the seed (and device) alone.
        with device:
            model = factory()
        if after_init is not None:
            with torch.no_grad():
                after_init(model)
    return model.to(torch.get_default_dtype()).eval()


@contextmanager
def draw_device(device: str | torch.device) -> Iterator[None]:
    """Draw the weights of the models built inside on ``device``.

    The CPU's generator is the same on every machine: the same seed gives the same bytes. But
    drawing is most of a large build on a CPU (27 of 35 s for Gemma 3 4B's widths with 2 layers,
    2 cores; 512 s for all 34): on a GPU it takes seconds, and the bytes come from the GPU's
    generator.
    """
    token = _DRAW_DEVICE.set(torch.device(device))
    try:
        yield
    finally:
        _DRAW_DEVICE.reset(token)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build inside with ``dtype`` as torch's default dtype, restored after.

    Parameters are then created in ``dtype`` directly: a bfloat16 twin of a 4B model never has a
    float32 copy in memory (17 GB instead of 8.6).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def save_twin(
    model: PreTrainedModel, processor: ProcessorMixin, out_dir: Path, gen_config: GenerationConfig
) -> None:
    """Write model, generation config and processor (tokenizer included) into `out_dir`."""
    model.generation_config = gen_config
    # A one-shard progress bar is noise in the CLI output; restore the caller's setting after.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out_dir)


def resolve_sizes(
    family: str, defaults: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge `overrides` into `defaults`, refusing names the family does not know.

    Args:
        family: Family name, for the error message.
        defaults: The family's default sizes.
        overrides: Values given by the caller.

    Returns:
        The merged sizes.
    """
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UsageError(
            f"unknown size override(s) {', '.join(unknown)} for tiny {family}; "
            f"known: {', '.join(defaults)}"
        )
    return {**defaults, **overrides}


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def check_heads(s: Mapping[str, Any], hidden: str, heads: str) -> None:
    require(
        s[hidden] % s[heads] == 0,
        f"{hidden}={s[hidden]} must be a multiple of {heads}={s[heads]}",
    )


def check_patches(s: Mapping[str, Any]) -> None:
    require(
        s["image_size"] % s["patch_size"] == 0,
        f"image_size={s['image_size']} must be a multiple of patch_size={s['patch_size']}",
    )


def llama_text_config(sizes: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast, eos_ids):
    """A Llama decoder config (the text model of LLaVA 1.5, SmolVLM and Idefics3)."""
    from transformers import LlamaConfig

    check_heads(sizes, "hidden_size", "num_attention_heads")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
    )


# Sizes every twin but Gemma 3 starts from; a family module adds or replaces what it needs.
SMALL_TEXT: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
SMALL_VISION: dict[str, Any] = {
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 2,
}


def siglip_config(sizes: Mapping[str, Any]):
    """A SigLIP tower config (the vision tower of PaliGemma and of LLaVA with SigLIP)."""
    from transformers import SiglipVisionConfig

    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    check_patches(sizes)
    return SiglipVisionConfig(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        layer_norm_eps=1e-6,
        # Only patch states are read (as in the real PaliGemma and SigLIP LLaVA configs); an
        # unused pooling head would get no gradient and stop DDP.
        vision_use_head=False,
    )


TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class HubTemplate:
    """A hub checkpoint's chat template, stored byte for byte in ``automodel/twins/templates/``.

    Attributes:
        file: the file name under ``automodel/twins/templates/``.
        checkpoint: the hub checkpoint that ships it (``owner/name``).
        source: where the copy was taken from (a package file, or a public repository's path and
            commit), so anyone can compare it.
        trl_file: its name in the installed TRL's ``trl/chat_templates/`` when copied from there
            (a test compares the bytes).
    """

    file: str
    checkpoint: str
    source: str
    trl_file: str | None = None

    def text(self) -> str:
        return (TEMPLATES / self.file).read_text(encoding="utf-8")
