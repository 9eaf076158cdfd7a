"""Qwen3-VL twin: dynamic resolution (32-pixel tokens), interleaved mRoPE, DeepStack features
from intermediate tower layers added to the first decoder layers.

The tokenizer and processor helpers here serve the Qwen3.5 twin too (same processor class,
same special-token strings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
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

# Qwen/Qwen3-VL-2B-Instruct's template (every Qwen3-VL Instruct size ships the same one; the copy
# of Qwen/Qwen3-VL-4B-Instruct's chat_template.json in sophgo/LLM-TPU
# models/Qwen3_VL/config/chat_template.json @ 2097a5a reads the same). TRL's weekly check compares
# its copy with that checkpoint (huggingface/trl scripts/check_chat_templates.py @ 71f34db).
CHAT_TEMPLATE = HubTemplate(
    file="qwen3_vl.jinja",
    checkpoint="Qwen/Qwen3-VL-2B-Instruct",
    source="trl 1.16.0, trl/chat_templates/qwen3_vl.jinja",
    trl_file="qwen3_vl.jinja",
)

# The special tokens of Qwen/Qwen3-VL-*-Instruct's tokenizer (ids 151643-151656 there, in this
# order), as AutoProcessor.from_pretrained("Qwen/Qwen3-VL-2B-Instruct") lists them in its
# added_tokens_decoder (special=True).
QWEN3_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Added tokens the templates write that the hub tokenizer keeps as plain (special=False) tokens:
# single tokens, but text may spell them (a reply that writes "<think>" is not refused).
QWEN3_PLAIN_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

# 32 pixels per token: 16-pixel patches, 2x2 merged (Qwen3-VL's preprocessor_config.json:
# patch_size 16, merge_size 2, temporal_patch_size 2; QwenLM/Qwen3-VL README.md @ 0f2afbe: "the
# compression ratio is 32", size.shortest_edge / size.longest_edge are min_pixels / max_pixels).
PIXELS_PER_TOKEN = 32 * 32

QWEN3_VL_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    # Interleaved mRoPE: the rotary half-dimension (head_dim / 2 = 16) split into temporal,
    # height and width sections, in the ratio of the real [24, 20, 20] (head_dim 128).
    "mrope_section": [6, 5, 5],
    **SMALL_VISION,
    # Three tower layers, DeepStack features from the first two (the real 4B: 24 layers,
    # features from layers 5, 11 and 17), added to the first two decoder layers.
    "vision_num_hidden_layers": 3,
    "deepstack_visual_indexes": [0, 1],
    # The hub processor takes 64 to 16,384 tokens per image (size.shortest_edge 65536,
    # size.longest_edge 16777216 pixels); the twin 4 to 16, so images stay a few tokens.
    "min_pixels": 4 * PIXELS_PER_TOKEN,
    "max_pixels": 16 * PIXELS_PER_TOKEN,
}


def qwen3_tokenizer(vocab_size: int, special: list[str], template: str) -> PreTrainedTokenizerFast:
    """The byte-level twin tokenizer with Qwen3's special and plain added tokens (``<|im_end|>``
    ends a turn, ``<|endoftext|>`` pads) and the processor's named tokens."""
    raw = train_tokenizer(special, vocab_size)
    tokenizer = wrap_tokenizer(
        raw,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=template,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t in QWEN3_PLAIN_TOKENS]
    )
    return tokenizer


def qwen3_processor(processor_cls, tokenizer, sizes: dict, template: str):
    """Qwen3-VL's processor (Qwen3.5 uses the same class) with the hub's image settings:
    16-pixel patches merged 2x2, two frames per temporal patch, mean and std 0.5, bicubic
    resampling (Qwen/Qwen3-VL-2B-Instruct and Qwen/Qwen3.5-4B preprocessor_config.json), pixel
    bounds shrunk to ``sizes``."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLVideoProcessor
    from transformers.image_utils import PILImageResampling

    shared = {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": PILImageResampling.BICUBIC,
    }
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": sizes["min_pixels"], "longest_edge": sizes["max_pixels"]},
        **shared,
    )
    # Videos as the hub's video_preprocessor_config.json (untouched by the tests).
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 4096, "longest_edge": 25165824}, fps=2, **shared
    )
    return processor_cls(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=template,
    )


def qwen3_vision_ids(tokenizer) -> dict[str, int]:
    """The config's image, video and vision-marker token ids."""
    return {
        "image_token_id": tokenizer.image_token_id,
        "video_token_id": tokenizer.video_token_id,
        "vision_start_token_id": token_id(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": token_id(tokenizer, "<|vision_end|>"),
    }


def _qwen3_vl_config(sizes: dict, tokenizer):
    import transformers as tf

    check_heads(sizes, "hidden_size", "num_attention_heads")
    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    require(
        sum(sizes["mrope_section"]) * 2 == head_dim,
        f"mrope_section={sizes['mrope_section']} must sum to head_dim / 2 = {head_dim // 2}",
    )
    deepstack = list(sizes["deepstack_visual_indexes"])
    require(
        all(0 <= i < sizes["vision_num_hidden_layers"] for i in deepstack)
        and len(deepstack) <= sizes["num_hidden_layers"],
        f"deepstack_visual_indexes={deepstack} must name tower layers, at most one per decoder "
        "layer (an unread DeepStack merger stops DDP)",
    )
    text = tf.Qwen3VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=head_dim,
        max_position_embeddings=sizes["max_position_embeddings"],
        # As Qwen3-VL-4B-Instruct's config.json: theta 5e6, interleaved sections.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": list(sizes["mrope_section"]),
            "mrope_interleaved": True,
        },
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = tf.Qwen3VLVisionConfig(
        depth=sizes["vision_num_hidden_layers"],
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_heads=sizes["vision_num_attention_heads"],
        out_hidden_size=sizes["hidden_size"],
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        deepstack_visual_indexes=deepstack,
    )
    # The 2B and 4B checkpoints tie lm_head to the input embeddings.
    config = tf.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,
        **qwen3_vision_ids(tokenizer),
    )
    config.dtype = torch.get_default_dtype()
    return config


def build_qwen3_vl(out_dir: Path, seed: int, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes("qwen3_vl", QWEN3_VL_DEFAULTS, overrides)
    template = CHAT_TEMPLATE.text()
    tokenizer = qwen3_tokenizer(sizes["vocab_size"], QWEN3_SPECIAL_TOKENS, template)
    config = _qwen3_vl_config(sizes, tokenizer)
    model = init_model(lambda: tf.Qwen3VLForConditionalGeneration(config), seed)
    processor = qwen3_processor(tf.Qwen3VLProcessor, tokenizer, sizes, template)
    # Qwen3-VL's generation_config.json: eos [<|im_end|>, <|endoftext|>].
    stops = ["<|im_end|>", "<|endoftext|>"]
    save_twin(model, processor, out_dir, generation_config(tokenizer, stops))
