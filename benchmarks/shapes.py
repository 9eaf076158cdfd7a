"""Model shapes the benchmarks build, the FLOPs of their matrix products, devices' peaks, and the
samples' token counts those FLOPs are counted on.

One place for Gemma 3 4B's shape (``real_shape.py`` builds it, ``vs_trl.py --gpu`` trains it,
``scripts/gpu_check.sh`` runs both) and for the headline twin of ``vs_trl.py``, which is Gemma 3 4B
scaled down. MFU (model FLOPs utilisation) is the FLOPs a step needs (``train_flops`` plus
the tower's forward) per second over the device's ``PEAK_TFLOPS``.
"""

from __future__ import annotations

# Gemma 3 4B (google/gemma-3-4b-it). Text and vision sizes, vocabulary and image settings from
# huggingface/transformers src/transformers/models/gemma3/convert_gemma3_weights.py @ 0d7e95d
# (_VARIANT_GEMMA_3_4B, _VISION_CONFIG; the checkpoint's vocabulary is 262,144 tokens plus the 64
# rows the converter adds with the vision encoder: 262,208; the processor: 896x896, 256 tokens
# per image, mean and std 0.5, Gemma3ImageProcessor's do_pan_and_scan left off).
GEMMA3_4B = {
    "vocab_size": 262_208,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "sliding_window": 1024,
    "max_position_embeddings": 131_072,
    "vision_hidden_size": 1152,
    "vision_intermediate_size": 4304,
    "vision_num_hidden_layers": 27,
    "vision_num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "mm_tokens_per_image": 256,
}

# The headline twin of benchmarks/vs_trl.py: Gemma 3 4B with every width and the decoder's depth
# divided by 8 (2560 -> 320, 10240 -> 1280, attention 8 / 4 heads of 256 -> 2 / 1 of 128, 34 -> 4
# layers; SigLIP 1152 -> 144, 4304 -> 538, 16 heads -> 2 of the same 72), keeping what does not
# scale:
# the 896 px image, its 4,096 patches pooled to 256 tokens, and the 262,144-token vocabulary. The
# tower keeps 11 of its 27 layers, the depth at which its FLOPs on one image are as many times
# the decoder's FLOPs on that image's 256 tokens as in the real model (2.8 against 2.7; see
# ``tower_to_decoder``). With the vocabulary unscaled, the output projection is 93% of the
# twin's decoder FLOPs per token (17% in Gemma 3 4B): docs/performance.md, "The headline".
HEADLINE_TWIN = {
    "hidden_size": 320,
    "intermediate_size": 1280,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "sliding_window": 1024,
    "vision_hidden_size": 144,
    "vision_intermediate_size": 538,
    "vision_num_hidden_layers": 11,
    "vision_num_attention_heads": 2,
    "image_size": 896,
    "patch_size": 14,
    "mm_tokens_per_image": 256,
}
HEADLINE_VOCAB = 262_144

# Dense bf16 peak TFLOP/s by a part of the device's name (the vendors' data sheets, without
# sparsity); an unknown device gets no MFU unless its peak is given.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named ``device_name`` (e.g. ``NVIDIA H200``), if known."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def sizes_from_config(config: dict) -> dict:
    """The sizes these functions read, from a saved Gemma 3 or Qwen2.5-VL ``config.json``."""
    text, vision = config["text_config"], config["vision_config"]
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    sizes = {k: text[k] for k in (*keys, "num_key_value_heads", "vocab_size")}
    if text.get("head_dim"):
        sizes["head_dim"] = text["head_dim"]
    sizes["vision_hidden_size"] = vision["hidden_size"]
    sizes["vision_intermediate_size"] = vision["intermediate_size"]
    sizes["vision_num_hidden_layers"] = vision.get("num_hidden_layers", vision.get("depth"))
    sizes["patch_size"] = vision["patch_size"]
    for key in ("image_size", "spatial_merge_size", "temporal_patch_size"):
        if key in vision:
            sizes[key] = vision[key]
    if "mm_tokens_per_image" in config:
        sizes["mm_tokens_per_image"] = config["mm_tokens_per_image"]
    return sizes


def tower_flops(sizes: dict) -> int:
    """Forward FLOPs of the SigLIP tower on one image: patch embedding, linear layers and
    attention scores and mixing (a multiply-add is 2 FLOPs)."""
    patches = (sizes["image_size"] // sizes["patch_size"]) ** 2
    h, inner = sizes["vision_hidden_size"], sizes["vision_intermediate_size"]
    per_layer = 2 * patches * (4 * h * h + 2 * h * inner) + 4 * patches * patches * h
    embed = 2 * patches * 3 * sizes["patch_size"] ** 2 * h
    return sizes["vision_num_hidden_layers"] * per_layer + embed


def qwen_tower_flops(sizes: dict, patches: int) -> int:
    """Forward FLOPs of the Qwen2.5-VL tower on one image of ``patches`` patches, an estimate
    from its linear layers only: the patch embedding (over ``temporal_patch_size`` frames), each
    block's qkv, output and gated MLP projections, and the merger's two layers over each
    ``spatial_merge_size``-square group. Attention scores and mixing are left out: most blocks
    attend within 112 px windows and a few over the whole image (at 1024x768, about 7% more)."""
    h, inner = sizes["vision_hidden_size"], sizes["vision_intermediate_size"]
    frames, merge = sizes.get("temporal_patch_size", 2), sizes.get("spatial_merge_size", 2)
    per_layer = 2 * patches * (4 * h * h + 3 * h * inner)
    embed = 2 * patches * 3 * frames * sizes["patch_size"] ** 2 * h
    wide = merge * merge * h
    merger = 2 * (patches // (merge * merge)) * (wide * wide + wide * sizes["hidden_size"])
    return sizes["vision_num_hidden_layers"] * per_layer + embed + merger


def head_dim(sizes: dict) -> int:
    """The attention heads' width (Qwen2.5-VL's config has none: the hidden size over heads)."""
    return sizes.get("head_dim") or sizes["hidden_size"] // sizes["num_attention_heads"]


def decoder_flops(sizes: dict, tokens: int, vocab_size: int | None = None) -> dict:
    """Forward FLOPs of the decoder over ``tokens`` tokens, split into its linear layers,
    attention (full, causal masking not discounted) and the output projection."""
    h, inner = sizes["hidden_size"], sizes["intermediate_size"]
    q = sizes["num_attention_heads"] * head_dim(sizes)
    kv = sizes["num_key_value_heads"] * head_dim(sizes)
    layers = sizes["num_hidden_layers"]
    vocab = vocab_size or sizes["vocab_size"]
    return {
        "linear": layers * 2 * tokens * (2 * h * q + 2 * h * kv + 3 * h * inner),
        "attention": layers * 4 * tokens * tokens * q,
        "output": 2 * tokens * h * vocab,
    }


def tower_to_decoder(sizes: dict, vocab_size: int | None = None) -> float:
    """The tower's forward FLOPs on one image over the decoder's on that image's tokens."""
    decoder = decoder_flops(sizes, sizes["mm_tokens_per_image"], vocab_size)
    return tower_flops(sizes) / sum(decoder.values())


def train_flops(
    sizes: dict,
    tokens: int,
    label_tokens: int,
    lora_rank: int | None,
    vocab_size: int | None = None,
) -> int:
    """FLOPs of the decoder's part of one training step on a sample of ``tokens`` tokens, with
    ``lora_rank`` adapters on every linear layer of its blocks, or (``None``) all of it trained;
    recomputation not counted:

    - each frozen weight: 4 per token (forward and input gradient), a trained one 6 (and its
      weight gradient);
    - the output projection: the same, at the ``label_tokens`` positions only (the logits at
      other positions are not needed: the chunked loss projects only where a label is);
    - attention scores and mixing: 3 times their forward (gradients for both operands);
    - each adapter weight: 6 per token.

    Both sides of ``vs_trl.py`` are measured against these FLOPs (the work a step needs), not
    against what each side computes.
    """
    forward = decoder_flops(sizes, tokens, vocab_size)
    output = forward["output"] * label_tokens // tokens
    per_weight = 3 if lora_rank is None else 2  # times the forward's 2 FLOPs per weight
    flops = per_weight * (forward["linear"] + output) + 3 * forward["attention"]
    if lora_rank is None:
        return flops
    h, inner = sizes["hidden_size"], sizes["intermediate_size"]
    q = sizes["num_attention_heads"] * head_dim(sizes)
    kv = sizes["num_key_value_heads"] * head_dim(sizes)
    # q, k, v, o, gate, up, down: rank x (inputs + outputs) each.
    adapters = lora_rank * (2 * (h + q) + 2 * (h + kv) + 3 * (h + inner))
    return flops + 6 * tokens * sizes["num_hidden_layers"] * adapters


def sample_counts(model_dir, data, max_length: int | None = None) -> list[tuple[int, int, int]]:
    """Tokens, label tokens and image tokens of each sample of the JSONL ``data``, through the
    training collate of the model folder ``model_dir``'s processor, one sample at a time."""
    from automodel.common import IGNORE_INDEX
    from automodel.datasets.collate import default_collate_fn
    from automodel.datasets.vlm import make_conversation_dataset
    from automodel.models.auto import load_processor

    processor = load_processor(str(model_dir))
    image_id = processor.tokenizer.image_token_id
    dataset = make_conversation_dataset(str(data))
    counts = []
    for i in range(len(dataset)):
        batch = default_collate_fn([dataset[i]], processor=processor, max_length=max_length)
        counts.append(
            (
                int(batch["attention_mask"].sum()),
                int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
                int((batch["input_ids"] == image_id).sum()),
            )
        )
    return counts
