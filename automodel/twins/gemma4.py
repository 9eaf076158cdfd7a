"""Gemma 4 twin (the on-device E4B shape): a patch-pooling vision tower, a vision embedder, a
Gemma 4 decoder with sliding and global layers, per-layer embeddings and shared KV layers.

Sources (cited below as "the converter" and "the template"):

- the converter: ``huggingface/transformers``
  ``src/transformers/models/gemma4/convert_gemma4_weights.py`` at commit
  ``0f3f0632a38798af2adf264adc752130ecc5fa66``, the script that wrote the ``google/gemma-4-*``
  checkpoints: the ``gemma-4-e4b`` variant's configs, the tokenizer's special tokens, the
  image processor's and processor's settings, the generation config's stop tokens.
- the template: TRL 1.16's ``trl/chat_templates/gemma4_v5.jinja``, the chat template of
  ``google/gemma-4-E2B-it`` at revision 899537982545a3e55ce64d34462b2efa5af85232 (TRL's
  ``chat_templates/README.md``); the converter gives E2B and E4B the same (on-device) template.

The real E4B checkpoint also has an audio tower; ``Gemma4Config`` takes ``audio_config=None``,
so the twin is image-only.
"""

from __future__ import annotations

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
from automodel.twins.tokenizer import train_tokenizer, wrap_tokenizer

CHAT_TEMPLATE = HubTemplate(
    file="gemma4_v5.jinja",
    checkpoint="google/gemma-4-E2B-it",
    source=(
        "trl 1.16.0 trl/chat_templates/gemma4_v5.jinja (google/gemma-4-E2B-it at "
        "899537982545a3e55ce64d34462b2efa5af85232, the current revision; E4B ships the same "
        "on-device template)"
    ),
    trl_file="gemma4_v5.jinja",
)

# The tokenizer's named special tokens (the converter's GemmaTokenizer(extra_special_tokens=...),
# plus <|video|>, which Gemma4Processor adds, and <mask>, in the hub tokenizer_config.json).
# Names are the attributes Gemma4Processor and the template read.
GEMMA4_NAMED_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
GEMMA4_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    *GEMMA4_NAMED_TOKENS.values(),
    "<|video|>",
]
# Generation stops at <eos>, at <turn|> (the end of a reply) and at <|tool_response> (a tool
# call waits for its answer): the converter's generation_config eos_token_id.
GEMMA4_STOP_TOKENS = ["<eos>", "<turn|>", "<|tool_response>"]

GEMMA4_DEFAULTS: dict[str, Any] = {
    # Shrunk: E4B has vocabulary 262,144 (also the per-layer embeddings' vocabulary), hidden
    # 2560, intermediate 10240, 42 layers, 8 heads, 2 KV heads, head_dim 256, global layers'
    # head_dim 512, per-layer input 256, the last 18 layers sharing KV, sliding window 512.
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "global_head_dim": 64,
    "hidden_size_per_layer_input": 16,
    # E4B repeats five sliding layers and one global layer; two of each keep both kinds among
    # the layers that compute KV and among those that reuse it.
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "num_kv_shared_layers": 2,
    # Shorter than a long training sample, so the sliding-window mask is exercised.
    "sliding_window": 128,
    # E2B and E4B attend causally over image tokens too (None); 26B-A4B and 31B set "vision":
    # both ways within an image on sliding-window layers.
    "use_bidirectional_attention": None,
    "max_position_embeddings": 4096,
    # Shrunk: E4B's tower has hidden 768, intermediate 3072, 16 layers, 12 heads of 64, and a
    # position table of 10,240 per axis (256 here covers the longest side the processor makes:
    # 70 tokens x 3 patches).
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 2,
    "vision_head_dim": 32,
    "position_embedding_size": 256,
    # Kept from E4B: 16-pixel patches pooled 3x3 into one soft token.
    "patch_size": 16,
    "pooling_kernel_size": 3,
    # Shrunk: E4B's budget is 280 soft tokens per image; 70 is the smallest the image processor
    # accepts (70, 140, 280, 560 or 1120).
    "max_soft_tokens": 70,
}


def _check_gemma4_sizes(s: Mapping[str, Any]) -> None:
    require(s["layer_types"][-1] == "full_attention", "layer_types must end with full_attention")
    kv_layers = s["layer_types"][: len(s["layer_types"]) - s["num_kv_shared_layers"]]
    require(
        set(kv_layers) == set(s["layer_types"]),
        f"num_kv_shared_layers={s['num_kv_shared_layers']} must leave a layer of each type "
        "that computes its own keys and values",
    )
    require(
        s["num_attention_heads"] % s["num_key_value_heads"] == 0,
        f"num_attention_heads={s['num_attention_heads']} must be a multiple of "
        f"num_key_value_heads={s['num_key_value_heads']}",
    )
    longest = s["max_soft_tokens"] * s["pooling_kernel_size"]
    require(
        s["position_embedding_size"] >= longest,
        f"position_embedding_size={s['position_embedding_size']} must cover the longest image "
        f"side, max_soft_tokens x pooling_kernel_size = {longest} patches",
    )


def _gemma4_configs(sizes: Mapping[str, Any], tokenizer, eos_ids: list[int]) -> tuple[Any, Any]:
    """The E4B-shaped text config and its vision tower's config (the converter's
    ``gemma-4-e4b`` variant and ``_ON_DEVICE_VISION_CONFIG``, sizes shrunk)."""
    from transformers import Gemma4TextConfig, Gemma4VisionConfig

    text_config = Gemma4TextConfig(
        vocab_size=len(tokenizer),
        vocab_size_per_layer_input=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        hidden_size_per_layer_input=sizes["hidden_size_per_layer_input"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=len(sizes["layer_types"]),
        layer_types=list(sizes["layer_types"]),
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=sizes["head_dim"],
        global_head_dim=sizes["global_head_dim"],
        attention_k_eq_v=False,
        use_bidirectional_attention=sizes["use_bidirectional_attention"],
        num_kv_shared_layers=sizes["num_kv_shared_layers"],
        final_logit_softcapping=30.0,
        sliding_window=sizes["sliding_window"],
        max_position_embeddings=sizes["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
    )
    vision_config = Gemma4VisionConfig(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        num_key_value_heads=sizes["vision_num_attention_heads"],
        head_dim=sizes["vision_head_dim"],
        patch_size=sizes["patch_size"],
        pooling_kernel_size=sizes["pooling_kernel_size"],
        position_embedding_size=sizes["position_embedding_size"],
        use_clipped_linears=True,
    )
    return text_config, vision_config


def _init_like_trained(model: PreTrainedModel, std: float) -> None:
    """Two weights transformers initialises as no trained checkpoint has them."""
    # The tower's 2D position table starts as ones, which gives every patch the same position.
    model.model.vision_tower.patch_embedder.position_embedding_table.normal_(0.0, std)
    # Gemma 4 scales attention logits by 1, not 1/sqrt(head_dim): the q and k norms' weights
    # carry the scale. At their initial ones the logits have variance head_dim (near-hard
    # attention), and the twin's training was chaotic: two runs equal but for how the batch was
    # split into micro-batches drifted 1e-2 apart within 5 SGD steps (lr 0.2). head_dim^-1/4 on
    # each gives unit variance, and the drift stays below 1e-4 over 10 steps.
    for name, module in model.named_modules():
        if name.endswith(("self_attn.q_norm", "self_attn.k_norm")):
            module.weight.fill_(module.weight.numel() ** -0.25)


def _gemma4_processor(sizes: Mapping[str, Any], tokenizer):
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    # The converter's image processor: no normalisation (the tower rescales pixels itself),
    # aspect-ratio preserving resize to at most max_soft_tokens x pooling_kernel_size^2 patches;
    # its class defaults (bicubic resample, rescale 1/255) stay.
    image_processor = Gemma4ImageProcessor(
        do_normalize=False,
        patch_size=sizes["patch_size"],
        max_soft_tokens=sizes["max_soft_tokens"],
        pooling_kernel_size=sizes["pooling_kernel_size"],
    )
    return Gemma4Processor(
        # The hub processor carries an audio feature extractor and a video processor too; they
        # hold no weights and the twin never feeds them.
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(),
        chat_template=CHAT_TEMPLATE.text(),
        image_seq_length=sizes["max_soft_tokens"],
    )


def build_gemma4(out_dir: Path, seed: int, **overrides: Any) -> None:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    sizes = resolve_sizes("gemma4", GEMMA4_DEFAULTS, overrides)
    _check_gemma4_sizes(sizes)

    raw = train_tokenizer(GEMMA4_SPECIAL_TOKENS, sizes["vocab_size"], bos_token="<bos>")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE.text(),
        extra_special_tokens=GEMMA4_NAMED_TOKENS,
    )
    tokenizer.mask_token = "<mask>"
    stops = generation_config(tokenizer, GEMMA4_STOP_TOKENS)

    text_config, vision_config = _gemma4_configs(sizes, tokenizer, stops.eos_token_id)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=None,
        image_token_id=ids("<|image|>"),
        boi_token_id=ids("<|image>"),
        eoi_token_id=ids("<image|>"),
        video_token_id=ids("<|video|>"),
        audio_token_id=ids("<|audio|>"),
        boa_token_id=ids("<|audio>"),
        eoa_token_index=ids("<audio|>"),
        eos_token_id=stops.eos_token_id,
    )
    config.dtype = torch.get_default_dtype()

    def init(model: PreTrainedModel) -> None:
        _init_like_trained(model, vision_config.initializer_range)

    model = init_model(lambda: Gemma4ForConditionalGeneration(config), seed, init)
    save_twin(model, _gemma4_processor(sizes, tokenizer), out_dir, stops)
