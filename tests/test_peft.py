"""LoRA through PEFT: default targets, patterns, saving, merging, export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from automodel.errors import UsageError
from automodel.models.families import family_of
from automodel.peft import LoraConfig, apply_lora, merge
from automodel.peft.lora import resolve_target_modules
from automodel.twins import TWIN_FAMILIES
from tests.conftest import run_cli, run_python


@pytest.fixture()
def model(tiny_gemma3):
    return AutoModelForImageTextToText.from_pretrained(tiny_gemma3)


def _vision_or_head(name: str) -> bool:
    return any(k in name for k in ("vision_tower", "multi_modal_projector", "lm_head"))


def test_default_targets_only_language_model_linears(model):
    names = resolve_target_modules(model, LoraConfig())
    assert names and not any(_vision_or_head(n) for n in names)
    layers = model.config.text_config.num_hidden_layers
    assert len(names) == 7 * layers  # q, k, v, o, gate, up, down per decoder layer
    # The trap the default avoids: a bare q_proj pattern also reaches the SigLIP tower.
    bare = resolve_target_modules(model, LoraConfig(target_modules=["*q_proj"]))
    assert any("vision_tower" in n for n in bare)


def _under(name: str, paths: tuple[str, ...]) -> bool:
    return any(name.startswith(path + ".") for path in paths)


@pytest.mark.parametrize("family", list(TWIN_FAMILIES))
def test_default_targets_of_every_family_stay_in_its_language_model(family, tiny_family):
    """The default ``LoraConfig()`` adapts linear layers of the registry's decoder paths only:
    none of the tower, the projector (Qwen2-VL's lies inside its tower) or ``lm_head``."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_family(family))
    parts = family_of(model)
    names = resolve_target_modules(model, LoraConfig())
    assert names
    assert [n for n in names if not _under(n, parts.decoder)] == [], parts.decoder
    head = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
    outside = [n for n in names if _under(n, parts.tower + parts.projector) or n in head]
    assert outside == []
    # What the default avoids: a bare pattern reaches every tower attention layer named like the
    # decoder's (SigLIP, CLIP, Idefics3; Qwen2-VL's tower fuses its projections into one qkv).
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    tower_q = [n for n in linear if _under(n, parts.tower) and n.endswith("q_proj")]
    bare = resolve_target_modules(model, LoraConfig(target_modules=["*q_proj"]))
    assert set(tower_q) <= set(bare) and not set(tower_q) & set(names)


def test_patterns_regex_exclude_and_errors(model):
    regex = r".*language_model.*\.(q_proj|v_proj)"
    names = resolve_target_modules(model, LoraConfig(target_modules=regex))
    assert names and all(n.endswith(("q_proj", "v_proj")) and "language_model" in n for n in names)
    names = resolve_target_modules(model, LoraConfig(exclude_modules=["*.mlp.*"]))
    assert names and not any(".mlp." in n for n in names)
    everything = resolve_target_modules(model, LoraConfig(match_all_linear=True))
    assert not any(_vision_or_head(n) for n in everything)
    with pytest.raises(UsageError, match="matches no linear layer"):
        resolve_target_modules(model, LoraConfig(target_modules=["*nothing*"]))
    assert LoraConfig(dim=4).r == 4


def test_only_adapters_train(model):
    peft_model = apply_lora(model, LoraConfig(r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_needs_cuda(model):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        apply_lora(model, LoraConfig(qlora=True))


def _randomise_adapters(peft_model, seed=0):
    # LoRA's B starts at zero, which would make merged == base trivially: give it weight.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_merge_lora_export_matches_adapter_logits(model, tiny_gemma3, tmp_path):
    from transformers import AutoProcessor

    from automodel.training.checkpoint import save_hf_folder

    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8))
    _randomise_adapters(peft_model)
    processor = AutoProcessor.from_pretrained(tiny_gemma3)
    adapter = save_hf_folder(peft_model, processor, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()

    ids = torch.tensor([[2, 4, 30, 31, 32, 33, 5]])
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=ids).logits

    out = tmp_path / "merged"
    result = run_cli(
        "export", "merge-lora", "--base", tiny_gemma3, "--adapter", adapter, "--out", out
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("model.safetensors", "config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).is_file(), name
    merged = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    # The merge changed the weights (the adapters were not zero).
    base_logits = AutoModelForImageTextToText.from_pretrained(tiny_gemma3)(input_ids=ids).logits
    assert not torch.allclose(base_logits, merged_logits, atol=1e-3)

    # PEFT's own loader restores the adapter in a fresh process from the saved folder.
    code = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText
base = AutoModelForImageTextToText.from_pretrained({str(tiny_gemma3)!r})
model = PeftModel.from_pretrained(base, {str(adapter)!r})
with torch.no_grad():
    logits = model(input_ids=torch.tensor({ids.tolist()})).logits
torch.save(logits, {str(tmp_path / "fresh.pt")!r})
"""
    fresh = run_python(code)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert torch.allclose(torch.load(tmp_path / "fresh.pt"), adapter_logits, atol=1e-6)


def test_merge_lora_keeps_a_bf16_base_in_bf16(tmp_path):
    # A bf16 base is merged and saved as bf16 (no float32 copy of the whole model, a merged
    # folder the base's size), equal to the in-memory merge of the training run's final_model;
    # a saved model then loads for generation in the dtype it was saved in.
    from transformers import AutoProcessor

    from automodel.models.auto import load_for_inference
    from automodel.recipes.vlm.export import merge_lora
    from automodel.training.checkpoint import save_hf_folder
    from automodel.twins import make_tiny

    base = make_tiny("gemma3", tmp_path / "base", dtype="bfloat16", vocab_size=1024)
    peft_model = apply_lora(
        AutoModelForImageTextToText.from_pretrained(base, dtype="auto"), LoraConfig(r=4, alpha=8)
    )
    _randomise_adapters(peft_model)
    processor = AutoProcessor.from_pretrained(base)
    adapter = save_hf_folder(peft_model, processor, tmp_path / "adapter")
    out = merge_lora(str(base), adapter, tmp_path / "merged")

    size, base_size = (
        (out / "model.safetensors").stat().st_size,
        (base / "model.safetensors").stat().st_size,
    )
    assert abs(size - base_size) < 0.01 * base_size
    merged = load_for_inference(str(out))
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    in_memory = merge(peft_model).state_dict()
    assert all(torch.equal(t, in_memory[k]) for k, t in merged.state_dict().items())
    assert {p.dtype for p in load_for_inference(str(out), torch.float32).parameters()} == {
        torch.float32
    }


def _lora_grads(tiny_gemma3, batch, checkpointing: bool) -> tuple[dict, list[bool]]:
    """LoRA gradients of one training step's loss, and whether the frozen tower's output
    required grad, with or without activation checkpointing."""
    from automodel.config.sections import FreezeConfig
    from automodel.distributed.parallelize import parallelize
    from automodel.models.freeze import apply_freeze, vision_modules

    base = AutoModelForImageTextToText.from_pretrained(tiny_gemma3)
    apply_freeze(base, FreezeConfig(freeze_vision_tower=True))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same lora_A in both models
        peft_model = apply_lora(base, LoraConfig(r=4, alpha=8))
    _randomise_adapters(peft_model)
    parallelize(peft_model, None, strategy="none", activation_checkpointing=checkpointing)
    peft_model.train()
    towers = vision_modules(peft_model)
    for tower in towers:
        tower.eval()  # as the recipe keeps a frozen tower
    tower_grad = []
    towers[-1].register_forward_hook(lambda m, i, out: tower_grad.append(out[0].requires_grad))
    peft_model(**batch).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    return grads, tower_grad


def test_activation_checkpointing_keeps_a_frozen_tower_out_of_autograd(tiny_gemma3):
    # transformers' checkpointing made every input embedding's output require grad, a frozen
    # tower's patch embedding too, and the tower then kept every layer's activations (2 GB a
    # layer for Gemma 3 at 896 px). Without that hook the adapters' gradients are the same.
    from PIL import Image
    from transformers import AutoProcessor

    from automodel.datasets.collate import default_collate_fn

    image = Image.new("RGB", (40, 30), (200, 40, 40))
    user = [{"type": "image", "image": image}, {"type": "text", "text": "Read it."}]
    reply = [{"type": "text", "text": "A red receipt with a total of 9,000."}]
    sample = {
        "conversation": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    }
    batch = default_collate_fn([sample], AutoProcessor.from_pretrained(tiny_gemma3))
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    plain, plain_tower = _lora_grads(tiny_gemma3, batch, checkpointing=False)
    recomputed, recomputed_tower = _lora_grads(tiny_gemma3, batch, checkpointing=True)
    assert plain_tower == recomputed_tower == [False]
    assert plain.keys() == recomputed.keys() and len(plain) > 0
    for name, grad in plain.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.allclose(grad, recomputed[name], atol=1e-6, rtol=1e-5), name


def test_merge_in_place_returns_plain_model(model):
    peft_model = apply_lora(model, LoraConfig(r=2))
    merged = merge(peft_model)
    assert type(merged).__name__ == "Gemma3ForConditionalGeneration"
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_merge_lora_rejects_a_non_adapter_folder(tiny_gemma3, tmp_path):
    result = run_cli(
        "export",
        "merge-lora",
        "--base",
        tiny_gemma3,
        "--adapter",
        tmp_path,
        "--out",
        tmp_path / "o",
    )
    assert result.returncode == 2 and "not a PEFT adapter folder" in result.stderr
