"""LFM2-VL twin (LFM2.5-VL): a SigLIP2 NaFlex tower, a pixel-unshuffle projector, and an LFM2
decoder that interleaves short-convolution layers with attention layers.

An image small enough for one tile keeps its aspect ratio and becomes between
``min_image_tokens`` and ``max_image_tokens`` tokens; a larger one is split into
``tile_size`` tiles (2 to 10 of them, each preceded by ``<|img_row_R_col_C|>``) plus a thumbnail
after ``<|img_thumbnail|>``, all between ``<|image_start|>`` and ``<|image_end|>``.

Hub facts, and where they come from:

- checkpoint ``LiquidAI/LFM2.5-VL-3B``: huggingface/trl ``scripts/check_chat_templates.py``
  (``REPOS``) and ``scripts/generate_tiny_models/for_conditional_generation/
  lfm2_vl_for_conditional_generation.py`` (``MODEL_ID``) load it from the hub;
- the chat template (``templates/lfm2_5_vl.jinja``): TRL 1.16's ``trl/chat_templates/
  lfm2_2_5_vl.jinja``, byte for byte ("Original LFM2.5-VL chat template (as shipped by
  ``LiquidAI/LFM2.5-VL-3B``)" in that folder's README.md; TRL's CI compares it with the hub weekly).
  It already wraps each reply and its ``<|im_end|>\\n`` in ``{% generation %}``;
- special tokens and the tokenizer's attribute names (``image_token`` ``<image>``,
  ``image_start_token``, ``image_end_token``, ``image_thumbnail``, bos ``<|startoftext|>``, eos
  ``<|im_end|>``, pad ``<|pad|>``): the LFM2-VL tokenizer_config.json (public copy:
  onnx-community/LFM2-VL-3B-ONNX); the tool-call and ``<think>`` tokens the template writes;
- tiling and token counts (16-pixel encoder patches, 2x2 pixel unshuffle, 512-pixel tiles,
  2..10 tiles plus a thumbnail, 64..256 tokens for a single tile, ``max_pixels_tolerance`` 2.0,
  bilinear resampling, mean / std 0.5): the ``Lfm2VlImageProcessor`` defaults of transformers 5.24,
  documented for ``LiquidAI/LFM2-VL-1.6B``; LFM2.5-VL's preprocessor_config.json could not be read
  here, so these are the family's documented defaults, not a verified copy;
- ``<|im_end|>`` ends a reply (the template; LFM2's generation config stops at it).

Shrunk to stay tiny: tiles (512 -> 128 pixels), the single-tile token range (64..256 -> 4..16,
the same 1:4 ratio, so a tile still holds ``max_image_tokens``), the tower (SigLIP2 400M -> hidden
64, 2 layers), the projector (hidden 2560 -> 128), the decoder (two layers: one short-convolution
and one attention layer; no feed-forward size auto-adjustment) and the vocabulary.
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
from automodel.twins.tokenizer import train_tokenizer, wrap_tokenizer

CHAT_TEMPLATE = HubTemplate(
    file="lfm2_5_vl.jinja",
    checkpoint="LiquidAI/LFM2.5-VL-3B",
    source="trl 1.16.0: trl/chat_templates/lfm2_2_5_vl.jinja",
    trl_file="lfm2_2_5_vl.jinja",
)

# Each tile of a split image is announced by its grid position (up to 10 tiles in a row or column).
_TILE_TOKENS = [f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11)]

LFM2_VL_SPECIAL_TOKENS = [
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<think>",
    "</think>",
    "<image>",
    "<|image_start|>",
    "<|image_end|>",
    "<|img_thumbnail|>",
    *_TILE_TOKENS,
]

LFM2_VL_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    **SMALL_VISION,
    "layer_types": ["conv", "full_attention"],
    "projector_hidden_size": 128,
    "encoder_patch_size": 16,
    "downsample_factor": 2,
    "tile_size": 128,
    "min_image_tokens": 4,
    "max_image_tokens": 16,
    "min_tiles": 2,
    "max_tiles": 10,
}


def _configs(sizes: dict, tokenizer) -> Any:
    import transformers as tf

    check_heads(sizes, "hidden_size", "num_attention_heads")
    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    require(
        len(sizes["layer_types"]) == sizes["num_hidden_layers"],
        f"layer_types={sizes['layer_types']} must name num_hidden_layers="
        f"{sizes['num_hidden_layers']} layers",
    )
    step = sizes["encoder_patch_size"] * sizes["downsample_factor"]
    require(
        sizes["tile_size"] % step == 0,
        f"tile_size={sizes['tile_size']} must be a multiple of encoder_patch_size x "
        f"downsample_factor = {step}",
    )
    text_config = tf.Lfm2Config(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        layer_types=list(sizes["layer_types"]),
        block_auto_adjust_ff_dim=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = tf.Siglip2VisionConfig(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        patch_size=sizes["encoder_patch_size"],
        # The projector reads the patch states; a pooling head would get no gradient (DDP).
        vision_use_head=False,
    )
    config = tf.Lfm2VlConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.image_token_id,
        projector_hidden_size=sizes["projector_hidden_size"],
        downsample_factor=sizes["downsample_factor"],
        tie_word_embeddings=True,
    )
    config.dtype = torch.get_default_dtype()
    return config


def build_lfm2_vl(out_dir: Path, seed: int, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes("lfm2_vl", LFM2_VL_DEFAULTS, overrides)
    template = CHAT_TEMPLATE.text()
    raw = train_tokenizer(LFM2_VL_SPECIAL_TOKENS, sizes["vocab_size"], bos_token="<|startoftext|>")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        chat_template=template,
        # Lfm2VlProcessor reads tokenizer.image_token / image_start_token / image_end_token.
        extra_special_tokens={
            "image_token": "<image>",
            "image_start_token": "<|image_start|>",
            "image_end_token": "<|image_end|>",
            "image_thumbnail": "<|img_thumbnail|>",
        },
    )
    config = _configs(sizes, tokenizer)
    model = init_model(lambda: tf.Lfm2VlForConditionalGeneration(config), seed)
    image_processor = tf.Lfm2VlImageProcessor(
        encoder_patch_size=sizes["encoder_patch_size"],
        downsample_factor=sizes["downsample_factor"],
        tile_size=sizes["tile_size"],
        size={"height": sizes["tile_size"], "width": sizes["tile_size"]},
        min_image_tokens=sizes["min_image_tokens"],
        max_image_tokens=sizes["max_image_tokens"],
        min_tiles=sizes["min_tiles"],
        max_tiles=sizes["max_tiles"],
        do_image_splitting=True,
        use_thumbnail=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = tf.Lfm2VlProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )
    save_twin(model, processor, out_dir, generation_config(tokenizer, ["<|im_end|>"]))
