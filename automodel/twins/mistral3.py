"""Mistral 3 twin (Mistral Small 3.1): a Pixtral tower at each image's own size, a patch-merging
projector, a Mistral decoder.

An image keeps its aspect ratio (shrunk to ``longest_edge`` when larger) and becomes one ``[IMG]``
per ``patch_size x spatial_merge_size`` cell, each row of cells closed by ``[IMG_BREAK]`` and the
last one by ``[IMG_END]``.

Hub facts, and where they come from:

- the chat template (``templates/mistral_small_3_1.jinja``): the processor chat template of
  ``mistralai/Mistral-Small-3.1-24B-Instruct-2503`` (its chat_template.json), as copied in
  huggingface/transformers ``tests/models/mistral3/test_processing_mistral3.py`` at
  043bb8dde14aae1a56b84cd230737cf5d0877912 (``prepare_processor_dict``; that test loads
  ``hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor``). A second public
  copy of the same chat_template.json, embedded verbatim in a training script, agrees at every
  offset checked. The hub file itself was not reachable here. The template renders today's date
  into its default system prompt (``strftime_now``), ends a reply with ``eos_token`` (``</s>``)
  and has no generation prompt: a conversation is prompted by ending it with ``[/INST]``;
- special tokens and their ids 0-19 (``<unk>`` ``<s>`` ``</s>`` ``[INST]`` ... ``[IMG]`` = 10,
  ``<pad>`` = 11, ``[IMG_BREAK]`` = 12, ``[IMG_END]`` = 13, ``[SYSTEM_PROMPT]`` ...): the Tekken
  tokenizer's control tokens; ``[IMG]`` = 10 and ``<s>`` = 1 are asserted by the same
  transformers test, ``[IMG_BREAK]`` / ``[IMG_END]`` = 12 / 13 are the defaults of
  ``convert_mistral3_weights_to_hf.py``;
- ``patch_size`` 14, ``spatial_merge_size`` 2, ``longest_edge`` 1540, CLIP mean / std, bicubic
  resampling: Mistral Small 3.1's processor_config.json / preprocessor_config.json (the
  ``PixtralImageProcessor`` mean, std and resampling are also its class defaults in
  transformers 5.24); ``image_token_index`` 10, ``vision_feature_layer`` -1, no projector bias:
  ``convert_mistral3_weights_to_hf.py``'s ``convert_config``;
- ``</s>`` ends a reply (the template).

Shrunk to stay tiny: ``longest_edge`` (1540 -> 112 pixels, so at most 4 x 4 image tokens), the
Pixtral tower (hidden 1024 -> 64, 24 -> 2 layers, its RoPE table sized for 112 pixels), the
decoder (``SMALL_TEXT``) and the vocabulary.
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
    file="mistral_small_3_1.jinja",
    checkpoint="mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    source=(
        "huggingface/transformers tests/models/mistral3/test_processing_mistral3.py@"
        "043bb8dde14aae1a56b84cd230737cf5d0877912, prepare_processor_dict()['chat_template'] "
        "(the checkpoint's chat_template.json)"
    ),
)

# The Tekken tokenizer's first control tokens, in id order.
MISTRAL3_SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]

MISTRAL3_DEFAULTS: dict[str, Any] = {
    **SMALL_TEXT,
    **SMALL_VISION,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "longest_edge": 112,
}

# CLIP normalisation (Mistral Small 3.1's preprocessor_config.json).
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _configs(sizes: dict, tokenizer) -> Any:
    import transformers as tf

    check_heads(sizes, "hidden_size", "num_attention_heads")
    check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    cell = sizes["patch_size"] * sizes["spatial_merge_size"]
    require(
        sizes["longest_edge"] % cell == 0,
        f"longest_edge={sizes['longest_edge']} must be a multiple of patch_size x "
        f"spatial_merge_size = {cell}",
    )
    text_config = tf.MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=sizes["hidden_size"] // sizes["num_attention_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        sliding_window=None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision_config = tf.PixtralVisionConfig(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        head_dim=sizes["vision_hidden_size"] // sizes["vision_num_attention_heads"],
        # The tower's 2D RoPE table covers image_size / patch_size positions per side.
        image_size=sizes["longest_edge"],
        patch_size=sizes["patch_size"],
    )
    config = tf.Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=sizes["spatial_merge_size"],
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )
    config.dtype = torch.get_default_dtype()
    return config


def build_mistral3(out_dir: Path, seed: int, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes("mistral3", MISTRAL3_DEFAULTS, overrides)
    template = CHAT_TEMPLATE.text()
    raw = train_tokenizer(MISTRAL3_SPECIAL_TOKENS, sizes["vocab_size"], bos_token="<s>")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=template,
    )
    config = _configs(sizes, tokenizer)
    model = init_model(lambda: tf.Mistral3ForConditionalGeneration(config), seed)
    image_processor = tf.PixtralImageProcessor(
        size={"longest_edge": sizes["longest_edge"]},
        patch_size={"height": sizes["patch_size"], "width": sizes["patch_size"]},
        image_mean=_IMAGE_MEAN,
        image_std=_IMAGE_STD,
    )
    processor = tf.PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=sizes["patch_size"],
        spatial_merge_size=sizes["spatial_merge_size"],
        chat_template=template,
    )
    save_twin(model, processor, out_dir, generation_config(tokenizer, ["</s>"]))
