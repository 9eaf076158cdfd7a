"""Tests for the tiny model twins (automodel.twins).

The gemma3 twin with default sizes has 3,424,768 parameters (vocabulary 2,048) and builds in
0.3-0.6 s on 2 CPU cores, after about 4 s of importing transformers; this module runs in
about 8 s. The build time and parameter count are printed by `test_size_and_build_time`
(visible with `pytest -s`).
"""

import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from automodel.datasets.collate import default_collate_fn
from automodel.errors import UsageError
from automodel.twins import TWIN_FAMILIES, make_tiny
from automodel.twins.gemma3 import CHAT_TEMPLATE
from automodel.twins.tokenizer import train_tokenizer
from tests.conftest import labelled_spans

SYSTEM = "You read receipts."
QUESTION = "What is on the receipt?"
REPLY_1 = '{"menu": [{"nm": "Latte", "cnt": "2", "price": "9,000"}]}'
FOLLOW_UP = "And the total?"
REPLY_2 = "The total is 9,000."


def _image(color: tuple[int, int, int] = (200, 40, 40)) -> Image.Image:
    # Not square and not the model's size, so the processor's resize is exercised.
    return Image.new("RGB", (90, 60), color)


def _two_turns() -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": _image()}, {"type": "text", "text": QUESTION}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": REPLY_1}]},
        {"role": "user", "content": FOLLOW_UP},
        {"role": "assistant", "content": REPLY_2},
    ]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_gemma3")
    start = time.perf_counter()
    path = make_tiny("gemma3", out, seed=0)
    build_seconds = time.perf_counter() - start
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    return {"path": path, "model": model, "processor": processor, "build_seconds": build_seconds}


def test_families_registry():
    assert "gemma3" in TWIN_FAMILIES


def test_loads_with_auto_classes(gemma3):
    model, processor = gemma3["model"], gemma3["processor"]
    tokenizer = processor.tokenizer
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(processor).__name__ == "Gemma3Processor"
    assert model.dtype == torch.float32
    assert not model.config.vision_config.vision_use_head

    config = model.config
    assert config.text_config.vocab_size == len(tokenizer)
    assert (
        config.image_token_id
        == tokenizer.image_token_id
        == tokenizer.convert_tokens_to_ids("<image_soft_token>")
    )
    assert config.boi_token_id == tokenizer.boi_token_id
    assert config.eoi_token_id == tokenizer.eoi_token_id
    assert processor.image_seq_length == config.mm_tokens_per_image == 16
    # Gemma's special tokens come first, in Gemma's order.
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<bos>", "<unk>"]

    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    generation = model.generation_config
    assert generation.eos_token_id == [tokenizer.eos_token_id, end_of_turn]
    assert generation.pad_token_id == tokenizer.pad_token_id
    assert generation.bos_token_id == tokenizer.bos_token_id

    assert (gemma3["path"] / "chat_template.jinja").is_file()
    assert processor.chat_template == CHAT_TEMPLATE.text()
    assert tokenizer.chat_template == CHAT_TEMPLATE.text()


def test_causal_lm_auto_class_maps_to_conditional_generation(gemma3):
    model = AutoModelForCausalLM.from_pretrained(gemma3["path"])
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"


def test_size_and_build_time(gemma3):
    params = sum(p.numel() for p in gemma3["model"].parameters())
    print(f"tiny gemma3: {params:,} parameters, built in {gemma3['build_seconds']:.2f} s")
    assert 3_000_000 <= params <= 8_000_000


def test_one_turn_rendering(gemma3):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": _image()}, {"type": "text", "text": " Hi "}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Latte 9,000\n"}]},
    ]
    text = gemma3["processor"].apply_chat_template(messages, tokenize=False)
    assert text == (
        f"<bos><start_of_turn>user\n{SYSTEM}\n\n<start_of_image>Hi<end_of_turn>\n"
        "<start_of_turn>model\nLatte 9,000<end_of_turn>\n"
    )
    prompt = gemma3["processor"].apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("Hi<end_of_turn>\n<start_of_turn>model\n")


def test_forward_gives_finite_loss_and_gradients_everywhere(gemma3):
    model, processor = gemma3["model"], gemma3["processor"]
    batch = processor.apply_chat_template(
        _two_turns(), tokenize=True, return_dict=True, return_tensors="pt"
    )
    model.train()
    try:
        loss = model(**batch, labels=batch["input_ids"]).loss
        assert math.isfinite(loss.item())
        loss.backward()
        # DDP refuses parameters that get no gradient (e.g. an unused vision head).
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert missing == []
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_generate_with_image(gemma3):
    model, processor = gemma3["model"], gemma3["processor"]
    inputs = processor.apply_chat_template(
        _two_turns()[:2],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[0] == 1
    assert inputs["input_ids"].shape[1] < output.shape[1] <= inputs["input_ids"].shape[1] + 4


def test_labels_cover_exactly_the_replies(gemma3):
    """Under the hub template (no {% generation %} blocks), the collate labels each reply and
    its <end_of_turn>, never an image token."""
    processor = gemma3["processor"]
    tokenizer = processor.tokenizer
    out = default_collate_fn([{"conversation": _two_turns()}], processor)
    ids = out["input_ids"][0].tolist()
    assert labelled_spans(out["labels"][0], tokenizer) == [
        f"{REPLY_1}<end_of_turn>",
        f"{REPLY_2}<end_of_turn>",
    ]
    image_tokens = {tokenizer.image_token_id, tokenizer.boi_token_id, tokenizer.eoi_token_id}
    assert ids.count(tokenizer.image_token_id) == processor.image_seq_length
    labelled = (out["labels"][0] != -100).tolist()
    assert not any(m and t in image_tokens for t, m in zip(ids, labelled))
    # The processor marks the image tokens for the bidirectional image attention mask.
    token_types = out["token_type_ids"][0].tolist()
    assert [t == tokenizer.image_token_id for t in ids] == [bool(x) for x in token_types]


def test_same_seed_same_bytes_other_seed_other_weights(gemma3, tmp_path):
    rng_before = torch.get_rng_state()
    again = make_tiny("gemma3", tmp_path / "again", seed=0)
    other = make_tiny("gemma3", tmp_path / "other", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)

    first = gemma3["path"]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_size_overrides(tmp_path):
    path = make_tiny(
        "gemma3",
        tmp_path,
        hidden_size=128,
        num_hidden_layers=2,
        image_size=64,
        mm_tokens_per_image=4,
        vocab_size=1024,
    )
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size == 1024
    assert model.config.text_config.hidden_size == 128
    assert processor.image_processor.size.height == 64
    batch = processor.apply_chat_template(
        _two_turns(), tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert batch["input_ids"][0].tolist().count(processor.tokenizer.image_token_id) == 4
    assert math.isfinite(model(**batch, labels=batch["input_ids"]).loss.item())


def test_bfloat16_twin_is_built_and_saved_in_bfloat16(tmp_path):
    # A real-shape twin (benchmarks/real_shape.py) must never exist as a float32 copy: its
    # weights are created in bf16, saved as bf16, and the config says so.
    path = make_tiny("gemma3", tmp_path / "bf16", dtype="bfloat16", vocab_size=1024)
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.dtype == torch.bfloat16
    # The dtype is part of the build record: a float32 twin in the folder is not reused.
    f32 = make_tiny("gemma3", tmp_path / "bf16", reuse=True, vocab_size=1024)
    model = AutoModelForImageTextToText.from_pretrained(f32, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.gpu
def test_twin_drawn_on_a_gpu_is_seeded_and_recorded(tmp_path):
    # real_shape.py --device cuda draws a 4B model's weights on the GPU: seconds, not minutes.
    cuda_before = torch.cuda.get_rng_state()
    first = make_tiny("gemma3", tmp_path / "first", device="cuda")
    again = make_tiny("gemma3", tmp_path / "again", device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), cuda_before)
    drawn = (first / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == drawn
    # The device is part of the build record: the CPU's draw replaces the GPU's.
    make_tiny("gemma3", tmp_path / "first", reuse=True)
    assert (first / "model.safetensors").read_bytes() != drawn


def test_qwen2_5_vl_twin_ties_embeddings_and_sets_full_attention_blocks(tmp_path):
    path = make_tiny(
        "qwen2_5_vl",
        tmp_path,
        tie_word_embeddings=True,
        vision_num_hidden_layers=3,
        fullatt_block_indexes=[0, 2],
    )
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.vision_config.fullatt_block_indexes == [0, 2]
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_vocabulary_past_the_corpus_is_filled_with_plain_entries():
    # Gemma 3's 262k vocabulary is a BPE vocabulary, not 260k added tokens (which cost ~0.5 GB
    # to load): the twin fills what the corpus does not reach with entries no merge produces.
    specials = ["<pad>", "<eos>", "<bos>"]
    trained = train_tokenizer(specials, 100_000).token_to_id("<unused0>")  # the corpus's share
    assert 1000 < trained < 100_000
    tokenizer = train_tokenizer(specials, trained + 50)
    assert tokenizer.get_vocab_size() == trained + 50
    assert [t.content for t in tokenizer.get_added_tokens_decoder().values()] == specials
    assert tokenizer.token_to_id("<unused0>") == trained
    assert tokenizer.token_to_id("<unused49>") == trained + 49
    assert trained not in tokenizer.encode("total <unused0> cash").ids


@pytest.mark.parametrize(
    "overrides",
    [{"mm_tokens_per_image": 9}, {"no_such_size": 1}, {"num_key_value_heads": 3}],
)
def test_invalid_overrides_raise_usage_error(tmp_path, overrides):
    with pytest.raises(UsageError):
        make_tiny("gemma3", tmp_path, **overrides)


def test_unknown_family_raises_usage_error(tmp_path):
    with pytest.raises(UsageError, match="gemma3") as info:
        make_tiny("no_such_family", tmp_path)
    assert "\n" not in str(info.value)
