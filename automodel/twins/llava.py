"""LLaVA 1.5 twin (CLIP tower, second-to-last layer) and LLaVA with a SigLIP tower."""

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
    llama_text_config,
    resolve_sizes,
    save_twin,
    siglip_config,
)
from automodel.twins.tokenizer import train_tokenizer, wrap_tokenizer

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# llava-hf/llava-1.5-7b-hf's chat template (chat_template.json), verbatim. Its replies end with
# a space and no </s>: the family registry's fix-up closes them with </s> when a run starts.
CHAT_TEMPLATE = HubTemplate(
    file="llava_1_5.jinja",
    checkpoint="llava-hf/llava-1.5-7b-hf",
    source="huggingface.co/llava-hf/llava-1.5-7b-hf, chat_template.json (the same string as "
    "in the llava-hf/llava-1.5-13b-hf and llava-interleave processors' tests in transformers)",
)

LLAVA_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    **SMALL_VISION,
    "image_size": 32,
    "patch_size": 8,
}


def build_llava_like(out_dir: Path, seed: int, family: str, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes(family, LLAVA_DEFAULTS, overrides)
    check_patches(sizes)
    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    raw = train_tokenizer(LLAVA_SPECIAL_TOKENS, sizes["vocab_size"], bos_token="<s>")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE.text(),
        extra_special_tokens={"image_token": "<image>"},
    )
    size = sizes["image_size"]
    if family == "llava":
        # LLaVA 1.5: CLIP, features of the second-to-last layer without the CLS token.
        vision_config = tf.CLIPVisionConfig(
            hidden_size=sizes["vision_hidden_size"],
            intermediate_size=sizes["vision_intermediate_size"],
            num_hidden_layers=sizes["vision_num_hidden_layers"],
            num_attention_heads=sizes["vision_num_attention_heads"],
            image_size=size,
            patch_size=sizes["patch_size"],
        )
        strategy, layer, extra_tokens = "default", -2, 1
        image_processor = tf.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    else:
        vision_config = siglip_config(sizes)
        strategy, layer, extra_tokens = "full", -1, 0
        image_processor = tf.SiglipImageProcessor(
            size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    image_seq_length = (size // sizes["patch_size"]) ** 2
    config = tf.LlavaConfig(
        vision_config=vision_config,
        text_config=llama_text_config(sizes, tokenizer, tokenizer.eos_token_id),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
    )
    config.dtype = torch.get_default_dtype()
    model = init_model(lambda: tf.LlavaForConditionalGeneration(config), seed)
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=sizes["patch_size"],
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        chat_template=CHAT_TEMPLATE.text(),
    )
    save_twin(model, processor, out_dir, generation_config(tokenizer, ["</s>"]))


def build_llava(out_dir: Path, seed: int, **overrides: Any) -> None:
    build_llava_like(out_dir, seed, "llava", **overrides)


def build_llava_siglip(out_dir: Path, seed: int, **overrides: Any) -> None:
    build_llava_like(out_dir, seed, "llava_siglip", **overrides)
