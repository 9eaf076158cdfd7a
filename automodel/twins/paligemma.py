"""PaliGemma (2) twin: a prefix-LM without a chat template, a Gemma 2 decoder with logit softcapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import processors

from automodel.twins.common import (
    SMALL_TEXT,
    SMALL_VISION,
    check_heads,
    generation_config,
    init_model,
    resolve_sizes,
    save_twin,
    siglip_config,
)
from automodel.twins.tokenizer import train_tokenizer, wrap_tokenizer

PALIGEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]

PALIGEMMA_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    "head_dim": 32,
    "sliding_window": 128,
    # PaliGemma 2's Gemma 2 decoder caps its logits: our label-position logits must too.
    "final_logit_softcapping": 30.0,
    **SMALL_VISION,
    "image_size": 64,
    "patch_size": 16,
}


def build_paligemma(out_dir: Path, seed: int, **overrides: Any) -> None:
    from transformers import (
        Gemma2Config,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    sizes = resolve_sizes("paligemma", PALIGEMMA_DEFAULTS, overrides)
    check_heads(sizes, "num_attention_heads", "num_key_value_heads")
    raw = train_tokenizer(PALIGEMMA_SPECIAL_TOKENS, sizes["vocab_size"])
    # The processor writes <bos> into the text itself; the pair segment (the suffix) gets type
    # id 1, which the processor turns into labels and the model into its prefix-LM mask.
    raw.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=None,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokens_per_image = (sizes["image_size"] // sizes["patch_size"]) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": sizes["image_size"], "width": sizes["image_size"]},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.image_seq_length = tokens_per_image
    # The processor adds 1,152 <locXXXX>/<segXXX> tokens: size the vocabulary after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text_config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=sizes["head_dim"],
        query_pre_attn_scalar=sizes["head_dim"],
        sliding_window=sizes["sliding_window"],
        final_logit_softcapping=sizes["final_logit_softcapping"],
        max_position_embeddings=sizes["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = PaliGemmaConfig(
        text_config=text_config,
        vision_config=siglip_config(sizes),
        image_token_index=tokenizer.image_token_id,
        projection_dim=sizes["hidden_size"],
        hidden_size=sizes["hidden_size"],
    )
    config.vision_config.projection_dim = sizes["hidden_size"]
    config.dtype = torch.get_default_dtype()
    model = init_model(lambda: PaliGemmaForConditionalGeneration(config), seed)
    save_twin(model, processor, out_dir, generation_config(tokenizer, ["<eos>"]))
