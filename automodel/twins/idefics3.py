"""SmolVLM and Idefics3 twins: images split into tiles plus a global view, a Llama decoder."""

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
    require,
    resolve_sizes,
    save_twin,
)
from automodel.twins.tokenizer import token_id, train_tokenizer, wrap_tokenizer

_IDEFICS3_IMAGE_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]


# The hub checkpoints' chat templates, verbatim (SmolVLM2 ships SmolVLM's byte for byte).
SMOLVLM_CHAT_TEMPLATE = HubTemplate(
    file="smolvlm.jinja",
    checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct",
    source="trl 1.16.0, trl/chat_templates/smolvlm.jinja",
    trl_file="smolvlm.jinja",
)
IDEFICS3_CHAT_TEMPLATE = HubTemplate(
    file="idefics3.jinja",
    checkpoint="HuggingFaceM4/Idefics3-8B-Llama3",
    source="trl 1.16.0, trl/chat_templates/idefics3.jinja",
    trl_file="idefics3.jinja",
)

IDEFICS3_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    **SMALL_VISION,
    # A 32-pixel tile of 8-pixel patches, pixel-shuffled by 2: 4 tokens per tile. Images are
    # resized to a 64-pixel longest edge and split into up to 2x2 tiles plus a global view.
    "image_size": 32,
    "patch_size": 8,
    "scale_factor": 2,
    "longest_edge": 64,
}


def _processor(smol: bool, sizes: dict, tokenizer, image_seq_len: int, template: str):
    """SmolVLM's or Idefics3's processor: image splitting into tiles plus a global view."""
    import transformers as tf

    image_kwargs = {
        "do_image_splitting": True,
        "size": {"longest_edge": sizes["longest_edge"]},
        "max_image_size": {"longest_edge": sizes["image_size"]},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    if smol:
        processor = tf.SmolVLMProcessor(
            image_processor=tf.SmolVLMImageProcessor(**image_kwargs),
            video_processor=tf.SmolVLMVideoProcessor(
                size={"longest_edge": sizes["longest_edge"]},
                max_image_size={"longest_edge": sizes["image_size"]},
            ),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=template,
        )
    else:
        processor = tf.Idefics3Processor(
            image_processor=tf.Idefics3ImageProcessor(**image_kwargs),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=template,
        )
    return processor


def build_idefics3_like(out_dir: Path, seed: int, family: str, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes(family, IDEFICS3_DEFAULTS, overrides)
    check_patches(sizes)
    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    smol = family == "smolvlm"
    bos, eos, pad = (
        ("<|im_start|>", "<end_of_utterance>", "<|im_end|>")
        if smol
        else ("<|begin_of_text|>", "<|end_of_text|>", "<pad>")
    )
    specials = list(dict.fromkeys([pad, "<|endoftext|>", bos, eos, *_IDEFICS3_IMAGE_TOKENS]))
    raw = train_tokenizer(specials, sizes["vocab_size"])
    template = (SMOLVLM_CHAT_TEMPLATE if smol else IDEFICS3_CHAT_TEMPLATE).text()
    tokenizer = wrap_tokenizer(
        raw,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        chat_template=template,
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    patches = sizes["image_size"] // sizes["patch_size"]
    require(
        patches % sizes["scale_factor"] == 0,
        f"scale_factor={sizes['scale_factor']} must divide the {patches}x{patches} patch grid",
    )
    image_seq_len = (patches // sizes["scale_factor"]) ** 2
    vision_cls = tf.SmolVLMVisionConfig if smol else tf.Idefics3VisionConfig
    vision_config = vision_cls(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
    )
    eos_ids = [token_id(tokenizer, eos), token_id(tokenizer, "<end_of_utterance>")]
    config_cls = tf.SmolVLMConfig if smol else tf.Idefics3Config
    config = config_cls(
        text_config=llama_text_config(sizes, tokenizer, eos_ids),
        vision_config=vision_config,
        scale_factor=sizes["scale_factor"],
        image_token_id=tokenizer.image_token_id,
    )
    config.dtype = torch.get_default_dtype()
    model_cls = tf.SmolVLMForConditionalGeneration if smol else tf.Idefics3ForConditionalGeneration
    model = init_model(lambda: model_cls(config), seed)
    processor = _processor(smol, sizes, tokenizer, image_seq_len, template)
    stops = list(dict.fromkeys([eos, "<end_of_utterance>"]))
    save_twin(model, processor, out_dir, generation_config(tokenizer, stops))


def build_smolvlm(out_dir: Path, seed: int, **overrides: Any) -> None:
    build_idefics3_like(out_dir, seed, "smolvlm", **overrides)


def build_idefics3(out_dir: Path, seed: int, **overrides: Any) -> None:
    build_idefics3_like(out_dir, seed, "idefics3", **overrides)
