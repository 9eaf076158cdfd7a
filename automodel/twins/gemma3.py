"""Gemma 3 twin: a SigLIP tower, an average-pooling projector, a Gemma 3 decoder with sliding-window
and global layers."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from automodel.twins.common import (
    HubTemplate,
    generation_config,
    init_model,
    require,
    resolve_sizes,
    save_twin,
)
from automodel.twins.tokenizer import token_id, train_tokenizer, wrap_tokenizer

GEMMA3_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# google/gemma-3-4b-it's chat template, verbatim.
CHAT_TEMPLATE = HubTemplate(
    file="gemma3.jinja",
    checkpoint="google/gemma-3-4b-it",
    source="trl 1.16.0, trl/chat_templates/gemma3.jinja (the google/gemma-3-* checkpoints')",
    trl_file="gemma3.jinja",
)

GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    # Shorter than a long training sample, so the sliding-window mask is exercised.
    "sliding_window": 128,
    # Real Gemma 3 alternates five sliding-window layers with one global layer.
    "sliding_window_pattern": 6,
    "max_position_embeddings": 2048,
    "vision_hidden_size": 128,
    "vision_intermediate_size": 512,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 2,
    "image_size": 128,
    "patch_size": 16,
    "mm_tokens_per_image": 16,
    # Pixel normalisation, one value for all three channels (real Gemma 3 uses 0.5 / 0.5).
    "image_mean": 0.5,
    "image_std": 0.5,
}


def _gemma3_layer_types(num_layers: int, pattern: int) -> list[str]:
    # The last layer is always global so that a stack shorter than the pattern still has one
    # layer that sees the whole sequence (the image included).
    return [
        "full_attention" if (i + 1) % pattern == 0 or i == num_layers - 1 else "sliding_attention"
        for i in range(num_layers)
    ]


def _check_gemma3_sizes(s: Mapping[str, Any]) -> None:
    require(
        s["hidden_size"] % s["num_attention_heads"] == 0,
        f"hidden_size={s['hidden_size']} must be a multiple of "
        f"num_attention_heads={s['num_attention_heads']}",
    )
    require(
        s["num_attention_heads"] % s["num_key_value_heads"] == 0,
        f"num_attention_heads={s['num_attention_heads']} must be a multiple of "
        f"num_key_value_heads={s['num_key_value_heads']}",
    )
    require(
        s["vision_hidden_size"] % s["vision_num_attention_heads"] == 0,
        f"vision_hidden_size={s['vision_hidden_size']} must be a multiple of "
        f"vision_num_attention_heads={s['vision_num_attention_heads']}",
    )
    require(
        s["image_size"] % s["patch_size"] == 0,
        f"image_size={s['image_size']} must be a multiple of patch_size={s['patch_size']}",
    )
    require(s["image_std"] > 0, f"image_std={s['image_std']} must be positive")
    # The projector average-pools the square patch grid down to a square grid of soft tokens.
    patches_per_side = s["image_size"] // s["patch_size"]
    tokens_per_side = math.isqrt(s["mm_tokens_per_image"])
    require(
        tokens_per_side > 0
        and tokens_per_side**2 == s["mm_tokens_per_image"]
        and patches_per_side % tokens_per_side == 0,
        f"mm_tokens_per_image={s['mm_tokens_per_image']} must be a square whose side divides the "
        f"{patches_per_side}x{patches_per_side} patch grid (image_size / patch_size)",
    )


def _gemma3_configs(sizes: dict, tokenizer, eos_ids: list[int]) -> tuple[Any, Any]:
    """Gemma 3's text config (sliding and global layers) and its SigLIP tower's config."""
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=sizes["head_dim"],
        # As in real Gemma 3, attention scores are scaled by 1/sqrt(head_dim).
        query_pre_attn_scalar=sizes["head_dim"],
        sliding_window=sizes["sliding_window"],
        layer_types=_gemma3_layer_types(
            sizes["num_hidden_layers"], sizes["sliding_window_pattern"]
        ),
        max_position_embeddings=sizes["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        layer_norm_eps=1e-6,
        # Gemma 3 reads the patch states, never the pooled head: with the head, its parameters
        # get no gradient and DDP stops on unused parameters.
        vision_use_head=False,
    )
    return text_config, vision_config


def _draw_projection(model: PreTrainedModel, std: float) -> None:
    # Gemma 3 initialises the image projection to zeros, which makes a fresh model blind to its
    # images and leaves the vision tower without gradient on the first step. A trained
    # checkpoint never looks like that, so the twin draws it like any other weight.
    model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, std)


def build_gemma3(out_dir: Path, seed: int, **overrides: Any) -> None:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    sizes = resolve_sizes("gemma3", GEMMA3_DEFAULTS, overrides)
    _check_gemma3_sizes(sizes)

    raw = train_tokenizer(GEMMA3_SPECIAL_TOKENS, sizes["vocab_size"], bos_token="<bos>")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE.text(),
        # Gemma3Processor reads these attributes (tokenizer.image_token, .boi_token_id, ...).
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    eos_ids = [tokenizer.eos_token_id, token_id(tokenizer, "<end_of_turn>")]

    text_config, vision_config = _gemma3_configs(sizes, tokenizer, eos_ids)
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=sizes["mm_tokens_per_image"],
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    config.dtype = torch.get_default_dtype()

    init = functools.partial(_draw_projection, std=config.initializer_range)
    model = init_model(lambda: Gemma3ForConditionalGeneration(config), seed, init)

    image_processor = Gemma3ImageProcessor(
        size={"height": sizes["image_size"], "width": sizes["image_size"]},
        image_mean=[float(sizes["image_mean"])] * 3,
        image_std=[float(sizes["image_std"])] * 3,
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE.text(),
        image_seq_length=sizes["mm_tokens_per_image"],
    )
    save_twin(model, processor, out_dir, generation_config(tokenizer, ["<eos>", "<end_of_turn>"]))
