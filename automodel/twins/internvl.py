"""InternVL 3 twin: an InternViT tower whose tiles are pixel-shuffled into a Qwen2 decoder.

Each image is cropped into up to ``max_patches`` square tiles (plus a thumbnail when it makes more
than one), and every tile becomes ``image_seq_length`` ``<IMG_CONTEXT>`` tokens between ``<img>``
and ``</img>``.

Hub facts, and where they come from:

- the chat template (``templates/internvl3.jinja``, byte for byte): the ``chat_template`` string of
  huggingface/transformers ``src/transformers/models/internvl/convert_internvl_weights_to_hf.py``,
  the script that wrote the ``OpenGVLab/InternVL3-*-hf`` processors (the version that renders an
  image as ``<IMG_CONTEXT>\\n``, which the transformers 5 processor expands);
- special tokens and their attribute names (``start_image_token`` ``<img>``, ``end_image_token``
  ``</img>``, ``context_image_token`` ``<IMG_CONTEXT>``, ``video_token`` ``<video>``, and the
  grounding tokens): ``write_tokenizer`` in the same script; the ChatML tokens of the Qwen2.5 tokenizer
  it starts from;
- tiles of 448 pixels, ImageNet mean / std, bicubic resampling, RGB conversion:
  ``write_image_processor`` in the same script; ``min_patches`` 1, ``max_patches`` 12 (the
  ``GotOcr2ImageProcessor`` defaults, which that script leaves as they are; the hub's
  preprocessor_config.json could not be read here) and ``crop_to_patches`` on (the
  processor turns it on: ``InternVLProcessor.images_kwargs`` in transformers 5.24);
- patch size 14, ``downsample_ratio`` 0.5, ``vision_feature_layer`` -1, the ``default`` feature
  strategy (drops the CLS token): ``InternVLConfig`` / ``InternVLVisionConfig`` defaults in
  transformers 5.24 (``@auto_docstring(checkpoint="OpenGVLab/InternVL3-1B-hf")``); the InternViT-300M
  tower of InternVL3-1B / 2B has layer norms, qkv biases and no QK norm;
- ``<|im_end|>`` ends a reply (the script forces ``eos_token_id`` 151645, ``<|im_end|>``, for the
  Qwen-based InternVL3 checkpoints).

Shrunk to stay tiny: the tile (448 -> 56 pixels, so 4 tokens per tile instead of 256), the tower
(hidden 1024 -> 64, 24 -> 2 layers), the decoder (``SMALL_TEXT``) and the vocabulary.
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
    check_patches,
    generation_config,
    init_model,
    require,
    resolve_sizes,
    save_twin,
)
from automodel.twins.tokenizer import train_tokenizer, wrap_tokenizer

CHAT_TEMPLATE = HubTemplate(
    file="internvl3.jinja",
    checkpoint="OpenGVLab/InternVL3-2B-hf",
    source=(
        "huggingface/transformers src/transformers/models/internvl/"
        "convert_internvl_weights_to_hf.py, chat_template (the string it writes into the -hf "
        "processors; the version rendering images as <IMG_CONTEXT>)"
    ),
)

INTERNVL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
]

INTERNVL_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    **SMALL_VISION,
    # One tile: 56 pixels of 14-pixel patches (4x4), pixel-shuffled by 0.5 to 2x2 = 4 tokens.
    "image_size": 56,
    "patch_size": 14,
    "min_patches": 1,
    "max_patches": 12,
}

# ImageNet normalisation (write_image_processor in the conversion script).
_IMAGE_MEAN = [0.485, 0.456, 0.406]
_IMAGE_STD = [0.229, 0.224, 0.225]


def _configs(sizes: dict, tokenizer) -> Any:
    import transformers as tf

    check_heads(sizes, "hidden_size", "num_attention_heads")
    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    check_patches(sizes)
    side = sizes["image_size"] // sizes["patch_size"]
    require(side % 2 == 0, f"image_size / patch_size = {side} must be even (0.5 pixel shuffle)")
    text_config = tf.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    vision_config = tf.InternVLVisionConfig(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        attention_bias=True,
        use_qk_norm=False,
        norm_type="layer_norm",
    )
    config = tf.InternVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=(side // 2) ** 2,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    config.dtype = torch.get_default_dtype()
    return config


def build_internvl(out_dir: Path, seed: int, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes("internvl", INTERNVL_DEFAULTS, overrides)
    template = CHAT_TEMPLATE.text()
    raw = train_tokenizer(INTERNVL_SPECIAL_TOKENS, sizes["vocab_size"])
    tokenizer = wrap_tokenizer(
        raw,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=template,
        # InternVLProcessor reads these attributes (tokenizer.start_image_token_id, ...).
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    config = _configs(sizes, tokenizer)
    model = init_model(lambda: tf.InternVLForConditionalGeneration(config), seed)
    tile = {"height": sizes["image_size"], "width": sizes["image_size"]}
    image_processor = tf.GotOcr2ImageProcessor(
        size=tile,
        crop_to_patches=True,
        min_patches=sizes["min_patches"],
        max_patches=sizes["max_patches"],
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
        do_convert_rgb=True,
    )
    processor = tf.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=tf.InternVLVideoProcessor(
            size=tile, image_mean=_IMAGE_MEAN, image_std=_IMAGE_STD
        ),
        image_seq_length=config.image_seq_length,
        chat_template=template,
    )
    stops = ["<|im_end|>", "<|endoftext|>"]
    save_twin(model, processor, out_dir, generation_config(tokenizer, stops))
