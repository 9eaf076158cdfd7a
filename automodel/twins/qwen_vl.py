"""Qwen2-VL and Qwen2.5-VL twins: dynamic resolution, mRoPE."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

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
from automodel.twins.tokenizer import token_id, train_tokenizer, wrap_tokenizer

QWEN_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL-Instruct's chat template, verbatim (Qwen2-VL-Instruct ships a byte-identical one).
CHAT_TEMPLATE = HubTemplate(
    file="qwen2_5_vl.jinja",
    checkpoint="Qwen/Qwen2.5-VL-3B-Instruct",
    source="trl 1.16.0, trl/chat_templates/qwen2_5_vl.jinja (Qwen2.5-VL's; Qwen2-VL's is the same)",
    trl_file="qwen2_5_vl.jinja",
)

QWEN_VL_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    # mRoPE splits the rotary half-dimension (head_dim / 2 = 16) into temporal, height and
    # width sections; they must sum to it.
    "mrope_section": [4, 6, 6],
    **SMALL_VISION,
    "patch_size": 14,
    # Dynamic resolution: an image becomes between min_pixels and max_pixels pixels, one token
    # per 28x28 (2x2 merged 14-pixel patches): 4 to 16 tokens here.
    "min_pixels": 4 * 28 * 28,
    "max_pixels": 16 * 28 * 28,
    # lm_head shares the input embedding (Qwen2.5-VL 3B's checkpoint does; the 7B's does not).
    "tie_word_embeddings": False,
    # Qwen2.5-VL: the tower blocks with full attention, the others attend within windows
    # (None: the last block only).
    "fullatt_block_indexes": None,
}


def _qwen_text_kwargs(sizes: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast) -> dict:
    check_heads(sizes, "hidden_size", "num_attention_heads")
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    require(
        sum(sizes["mrope_section"]) * 2 == head_dim,
        f"mrope_section={sizes['mrope_section']} must sum to head_dim / 2 = {head_dim // 2}",
    )
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["num_key_value_heads"],
        "max_position_embeddings": sizes["max_position_embeddings"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": list(sizes["mrope_section"]),
        },
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _qwen_configs(family: str, sizes: dict, text: dict) -> tuple[Any, Any, tuple]:
    """The text and vision configs of Qwen2-VL or Qwen2.5-VL, and the family's config, model
    and processor classes."""
    import transformers as tf

    vision = {
        "depth": sizes["vision_num_hidden_layers"],
        "num_heads": sizes["vision_num_attention_heads"],
        "patch_size": sizes["patch_size"],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_5_vl":
        full_attention = sizes["fullatt_block_indexes"]
        if full_attention is None:
            full_attention = [sizes["vision_num_hidden_layers"] - 1]
        vision_config = tf.Qwen2_5_VLVisionConfig(
            **vision,
            hidden_size=sizes["vision_hidden_size"],
            intermediate_size=sizes["vision_intermediate_size"],
            out_hidden_size=sizes["hidden_size"],
            # Window attention in the other blocks, as in the real model.
            window_size=112,
            fullatt_block_indexes=list(full_attention),
        )
        classes = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
        return tf.Qwen2_5_VLTextConfig(**text), vision_config, classes
    vision_config = tf.Qwen2VLVisionConfig(
        **vision,
        embed_dim=sizes["vision_hidden_size"],
        mlp_ratio=sizes["vision_intermediate_size"] // sizes["vision_hidden_size"],
        hidden_size=sizes["hidden_size"],
    )
    classes = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
    return tf.Qwen2VLTextConfig(**text), vision_config, classes


def build_qwen_vl(out_dir: Path, seed: int, family: str, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes(family, QWEN_VL_DEFAULTS, overrides)
    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    raw = train_tokenizer(QWEN_VL_SPECIAL_TOKENS, sizes["vocab_size"])
    tokenizer = wrap_tokenizer(
        raw,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE.text(),
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    text = _qwen_text_kwargs(sizes, tokenizer)
    text_config, vision_config, classes = _qwen_configs(family, sizes, text)
    config_cls, model_cls, processor_cls = classes
    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=token_id(tokenizer, "<|vision_end|>"),
        tie_word_embeddings=sizes["tie_word_embeddings"],
    )
    config.dtype = torch.get_default_dtype()
    model = init_model(lambda: model_cls(config), seed)
    pixels = {"min_pixels": sizes["min_pixels"], "max_pixels": sizes["max_pixels"]}
    processor = processor_cls(
        image_processor=tf.Qwen2VLImageProcessor(patch_size=sizes["patch_size"], **pixels),
        video_processor=tf.Qwen2VLVideoProcessor(patch_size=sizes["patch_size"], **pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE.text(),
    )
    stops = ["<|im_end|>", "<|endoftext|>"]
    save_twin(model, processor, out_dir, generation_config(tokenizer, stops))


def build_qwen2_vl(out_dir: Path, seed: int, **overrides: Any) -> None:
    build_qwen_vl(out_dir, seed, "qwen2_vl", **overrides)


def build_qwen2_5_vl(out_dir: Path, seed: int, **overrides: Any) -> None:
    build_qwen_vl(out_dir, seed, "qwen2_5_vl", **overrides)
