"""Qwen3.5 twin through its image path: the Qwen3-VL-style tower and processor, and a decoder
that mixes Gated DeltaNet (linear attention) layers with gated full-attention layers, three to
one. transformers' PyTorch fallback runs the linear-attention layers on the CPU (no
flash-linear-attention or causal-conv1d needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from automodel.twins.common import (
    SMALL_TEXT,
    SMALL_VISION,
    HubTemplate,
    check_heads,
    generation_config,
    init_model,
    require,
    resolve_sizes,
    save_twin,
)
from automodel.twins.qwen3_vl import (
    PIXELS_PER_TOKEN,
    QWEN3_SPECIAL_TOKENS,
    qwen3_processor,
    qwen3_tokenizer,
    qwen3_vision_ids,
)

# The template Qwen/Qwen3.5-4B ships (4B and larger: thinking on unless enable_thinking=false;
# 2B and smaller ship qwen3_5_nothink.jinja). TRL's weekly check compares its copy with that
# checkpoint (huggingface/trl scripts/check_chat_templates.py @ 71f34db, REPOS).
CHAT_TEMPLATE = HubTemplate(
    file="qwen3_5_think.jinja",
    checkpoint="Qwen/Qwen3.5-4B",
    source="trl 1.16.0, trl/chat_templates/qwen3_5_think.jinja",
    trl_file="qwen3_5_think.jinja",
)

QWEN3_5_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    # Qwen/Qwen3.5-4B's config.json: 32 layers, every fourth full attention (3, 7, ..., 31),
    # the others Gated DeltaNet. Shrunk to 4 layers, one full-attention layer last.
    "num_hidden_layers": 4,
    "full_attention_interval": 4,
    # 4B: head_dim 256 with 16 heads (wider than hidden 2560), a quarter of it rotary, split
    # [11, 11, 10] into temporal, height and width sections (interleaved). Here 64 with 4 heads:
    # 16 rotary dimensions, sections summing to 8.
    "head_dim": 64,
    "mrope_section": [3, 3, 2],
    # 4B: 16 key heads and 32 value heads of 128 in the linear-attention layers, a causal
    # convolution of width 4 over q, k and v.
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    **SMALL_VISION,
    # The hub processor takes 64 to 16,384 tokens per image; the twin 4 to 16.
    "min_pixels": 4 * PIXELS_PER_TOKEN,
    "max_pixels": 16 * PIXELS_PER_TOKEN,
}


def _text_config(sizes: dict, tokenizer):
    from transformers import Qwen3_5TextConfig

    rotary = int(sizes["head_dim"] * 0.25)
    require(
        sum(sizes["mrope_section"]) * 2 == rotary,
        f"mrope_section={sizes['mrope_section']} must sum to a quarter of head_dim / 2 = "
        f"{rotary // 2} (partial_rotary_factor 0.25)",
    )
    check_heads(sizes, "linear_num_value_heads", "linear_num_key_heads")
    interval = sizes["full_attention_interval"]
    require(
        1 <= interval <= sizes["num_hidden_layers"],
        f"full_attention_interval={interval} must leave at least one full-attention layer among "
        f"num_hidden_layers={sizes['num_hidden_layers']}",
    )
    return Qwen3_5TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=sizes["head_dim"],
        layer_types=[
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(sizes["num_hidden_layers"])
        ],
        linear_num_key_heads=sizes["linear_num_key_heads"],
        linear_num_value_heads=sizes["linear_num_value_heads"],
        linear_key_head_dim=sizes["linear_head_dim"],
        linear_value_head_dim=sizes["linear_head_dim"],
        linear_conv_kernel_dim=sizes["linear_conv_kernel_dim"],
        max_position_embeddings=sizes["max_position_embeddings"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "mrope_section": list(sizes["mrope_section"]),
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
        },
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _qwen3_5_config(sizes: dict, tokenizer):
    from transformers import Qwen3_5Config, Qwen3_5VisionConfig

    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    vision = Qwen3_5VisionConfig(
        depth=sizes["vision_num_hidden_layers"],
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_heads=sizes["vision_num_attention_heads"],
        out_hidden_size=sizes["hidden_size"],
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    # Qwen3.5-4B ties lm_head to the input embeddings.
    config = Qwen3_5Config(
        text_config=_text_config(sizes, tokenizer),
        vision_config=vision,
        tie_word_embeddings=True,
        **qwen3_vision_ids(tokenizer),
    )
    config.dtype = torch.get_default_dtype()
    return config


def build_qwen3_5(out_dir: Path, seed: int, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes("qwen3_5", QWEN3_5_DEFAULTS, overrides)
    template = CHAT_TEMPLATE.text()
    # Qwen3.5's tokenizer spells its special tokens as Qwen3-VL's (<|im_end|> 248046,
    # <|endoftext|> 248044, the vision tokens 248053-248057).
    tokenizer = qwen3_tokenizer(sizes["vocab_size"], QWEN3_SPECIAL_TOKENS, template)
    config = _qwen3_5_config(sizes, tokenizer)
    model = init_model(lambda: tf.Qwen3_5ForConditionalGeneration(config), seed)
    processor = qwen3_processor(tf.Qwen3VLProcessor, tokenizer, sizes, template)
    # Qwen3.5's generation_config.json: eos [<|im_end|>, <|endoftext|>] (248046, 248044).
    stops = ["<|im_end|>", "<|endoftext|>"]
    save_twin(model, processor, out_dir, generation_config(tokenizer, stops))
