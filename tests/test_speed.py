"""Speed levers: each is a config switch that leaves the loss unchanged, and the TRL benchmark runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from automodel.datasets.samplers import LengthGroupedSampler, estimate_lengths
from automodel.errors import UsageError
from automodel.loss import ChunkedCrossEntropy, MaskedCrossEntropy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def receipts(tmp_path_factory) -> Path:
    """8 one-image conversations whose answers run from 2 to 40 words."""
    from PIL import Image

    root = tmp_path_factory.mktemp("conversations")
    words = ["total", "cash", "change", "coffee", "latte", "tea", "croissant", "muffin", "tax"]
    with open(root / "train.jsonl", "w") as f:
        for i in range(8):
            Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 90)).save(root / f"{i}.png")
            answer = " ".join(words[(i * j) % len(words)] for j in range(2 + (i * 5) % 39))
            user = [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": "Read it."}]
            reply = [{"type": "text", "text": answer}]
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return root / "train.jsonl"


def config(model: Path, data: Path, out: Path, steps: int = 3, **sections) -> dict:
    """A small run: 8 conversations, global batch 4 in micro-batches of 2, no validation."""
    cfg = {
        "model": {
            "_target_": "automodel.models.AutoModelForImageTextToText.from_pretrained",
            "pretrained_model_name_or_path": str(model),
        },
        "dataset": {
            "_target_": "automodel.datasets.vlm.make_conversation_dataset",
            "path_or_dataset": str(data),
        },
        "dataloader": {"num_workers": 0},
        "step_scheduler": {
            "global_batch_size": 4,
            "local_batch_size": 2,
            "max_steps": steps,
            "log_every_steps": 1,
        },
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.0},
        "precision": {"autocast": "none"},
        "checkpoint": {"enabled": False, "checkpoint_dir": str(out)},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def train(cfg: dict):
    """Runs the recipe in this process; returns it and the per-step losses."""
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    recipe = FinetuneRecipeForVLM(cfg)
    recipe.setup()
    recipe.train()
    lines = Path(cfg["checkpoint"]["checkpoint_dir"], "training.jsonl").read_text().splitlines()
    return recipe, [json.loads(line)["loss"] for line in lines if '"loss"' in line]


# --------------------------------------------------------------------------- chunked linear + CE
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_cross_entropy_equals_full_logits(softcap, chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (23,))
    targets[[2, 11]] = -100
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected = MaskedCrossEntropy()(logits, targets, 40)
    expected.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    loss = ChunkedCrossEntropy(chunk_size=chunk_size)(hidden, weight, targets, 40, softcap=softcap)
    (2 * loss).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, 2 * grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, 2 * grads[1], rtol=1e-4, atol=1e-6)
    reference = F.cross_entropy(logits.detach(), targets, ignore_index=-100)
    torch.testing.assert_close(
        ChunkedCrossEntropy(5)(hidden, weight, targets, softcap=softcap), reference
    )


def test_chunked_cross_entropy_through_the_recipe(tmp_path, tiny_gemma3, receipts):
    _, plain = train(config(tiny_gemma3, receipts, tmp_path / "plain"))
    chunked_loss = {"_target_": "automodel.loss.ChunkedCrossEntropy", "chunk_size": 16}
    _, chunked = train(config(tiny_gemma3, receipts, tmp_path / "chunked", loss_fn=chunked_loss))
    assert len(plain) == 3
    assert chunked == pytest.approx(plain, rel=1e-5)


# --------------------------------------------------------------------------- length grouping
def test_length_grouped_sampler_groups_covers_and_splits_ranks():
    lengths = [(i * 37) % 101 for i in range(96)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3, mega_batch_mult=4)
    order = list(sampler)
    assert sorted(order) == list(range(96))
    assert list(sampler) != order  # the next epoch draws a new permutation
    batches = [order[i : i + 4] for i in range(0, 96, 4)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    shuffled = torch.randperm(96, generator=torch.Generator().manual_seed(0)).tolist()
    random_spread = sum(
        max(lengths[i] for i in shuffled[j : j + 4]) - min(lengths[i] for i in shuffled[j : j + 4])
        for j in range(0, 96, 4)
    )
    assert spread < random_spread / 3
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first

    ranks = [
        list(LengthGroupedSampler(lengths, batch_size=4, rank=r, world_size=2, seed=3))
        for r in range(2)
    ]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(96))
    # 90 samples make 23 batches: one is repeated so that each of 4 ranks gets 6.
    uneven = [LengthGroupedSampler(lengths[:90], 4, rank=r, world_size=4, seed=3) for r in range(4)]
    assert [len(s.batches(0)[s.rank :: 4]) for s in uneven] == [6, 6, 6, 6]
    assert set().union(*(list(s) for s in uneven)) == set(range(90))


def test_length_grouped_sampler_resumes_mid_epoch_through_the_loader():
    from torchdata.stateful_dataloader import StatefulDataLoader

    lengths = list(range(40))

    def loader():
        sampler = LengthGroupedSampler(lengths, batch_size=4, seed=7)
        return StatefulDataLoader(list(range(40)), batch_size=4, sampler=sampler)

    full = [b.tolist() for epoch in range(2) for b in loader_epochs(loader(), 2)[epoch]]
    first = loader()
    it = iter(first)
    seen = [next(it).tolist() for _ in range(3)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in resumed]
    following = [b.tolist() for b in resumed]
    assert seen + rest + following == full


def loader_epochs(loader, epochs: int) -> list[list]:
    return [list(loader) for _ in range(epochs)]


def test_estimated_lengths_follow_the_answers(tiny_gemma3, receipts):
    from automodel.datasets.vlm import make_conversation_dataset
    from automodel.models.auto import load_processor

    dataset = make_conversation_dataset(str(receipts))
    processor = load_processor(str(tiny_gemma3))
    lengths = estimate_lengths(dataset, processor)
    tokens = [
        len(processor.tokenizer(dataset[i]["conversation"][-1]["content"][0]["text"]).input_ids)
        for i in range(8)
    ]
    assert all(length >= processor.image_seq_length for length in lengths)
    ranks = sorted(range(8), key=lengths.__getitem__)
    assert ranks == sorted(range(8), key=tokens.__getitem__)


def test_group_by_length_gives_the_same_loss_when_a_step_is_an_epoch(
    tmp_path, tiny_gemma3, receipts
):
    # One optimizer step sees all 8 samples (4 micro-batches): the token-weighted loss and the
    # update cannot depend on how the samples are grouped into micro-batches.
    steps = {"global_batch_size": 8, "local_batch_size": 2, "max_steps": 2}
    _, plain = train(config(tiny_gemma3, receipts, tmp_path / "plain", step_scheduler=steps))
    grouped_cfg = config(
        tiny_gemma3,
        receipts,
        tmp_path / "grouped",
        step_scheduler=steps,
        dataloader={"group_by_length": True},
    )
    recipe, grouped = train(grouped_cfg)
    assert isinstance(recipe.train_loader.sampler, LengthGroupedSampler)
    assert grouped == pytest.approx(plain, rel=1e-5)


def test_group_by_length_must_be_a_boolean(tmp_path, tiny_gemma3, receipts):
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    cfg = config(tiny_gemma3, receipts, tmp_path, dataloader={"group_by_length": "yes"})
    with pytest.raises(UsageError, match="dataloader.group_by_length"):
        FinetuneRecipeForVLM(cfg)


# --------------------------------------------------------------------------- vision cache
# Two epochs of the 8 conversations at a constant learning rate, so a run stopped after the
# first epoch and resumed follows the same schedule as one run of 4 steps.
CACHE_RUN = {"step_scheduler": {"max_steps": 4}, "lr_scheduler": {"lr_decay_style": "constant"}}


def trained_weights(recipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}


def assert_same_training(recipe, losses: list[float], reference: tuple) -> None:
    """The logged losses and the trained weights are bit for bit the reference run's."""
    ref_losses, ref_weights = reference
    assert losses == ref_losses  # the logged floats, exactly
    weights = trained_weights(recipe)
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[n], ref_weights[n]) for n in weights)


@pytest.fixture(scope="module")
def uncached(tmp_path_factory, tiny_gemma3, receipts) -> tuple:
    """The losses and trained weights of CACHE_RUN without a vision cache."""
    recipe, losses = train(
        config(tiny_gemma3, receipts, tmp_path_factory.mktemp("uncached"), **CACHE_RUN)
    )
    return losses, trained_weights(recipe)


def count_tower_images(recipe) -> list[int]:
    """A list that gets the number of images of each tower forward that really runs."""
    embedded: list[int] = []
    inner = recipe.vision_cache.tower.embeddings
    inner.register_forward_hook(lambda m, args, kw_out: embedded.append(len(args[0])))
    return embedded


def test_vision_cache_is_exact_and_runs_the_tower_once_per_image(
    tmp_path, tiny_gemma3, receipts, uncached
):
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    cfg = config(tiny_gemma3, receipts, tmp_path, vision_cache={"enabled": True}, **CACHE_RUN)
    recipe = FinetuneRecipeForVLM(cfg)
    recipe.setup()
    embedded = count_tower_images(recipe)
    recipe.train()
    lines = (tmp_path / "training.jsonl").read_text().splitlines()
    assert_same_training(recipe, [json.loads(line)["loss"] for line in lines], uncached)
    assert sum(embedded) == 8
    assert recipe.vision_cache.hits == 8


def test_vision_cache_on_disk_is_exact_and_read_back_after_a_resume(
    tmp_path, tiny_gemma3, receipts, uncached, capsys
):
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    store = tmp_path / "features"
    cache = {"enabled": True, "storage": "disk", "path": str(store)}
    checkpoint = {"enabled": True, "checkpoint_dir": str(tmp_path / "run")}
    cfg = config(tiny_gemma3, receipts, tmp_path, vision_cache=cache, **CACHE_RUN)
    cfg["checkpoint"], cfg["step_scheduler"]["ckpt_every_steps"] = checkpoint, 2
    first = FinetuneRecipeForVLM(
        {**cfg, "step_scheduler": {**cfg["step_scheduler"], "max_steps": 2}}
    )
    first.setup()
    first.train()  # the first epoch: every image computed and written
    assert first.vision_cache.counts()[:3] == [0, 8, 8]
    assert len(list(store.glob("*/*/*.safetensors"))) == 8
    capsys.readouterr()

    resumed = FinetuneRecipeForVLM(cfg)
    resumed.setup()
    embedded = count_tower_images(resumed)
    resumed.train()  # resumes at step 2: the second epoch reads every image from disk
    assert "resuming from" in capsys.readouterr().out
    assert sum(embedded) == 0 and resumed.vision_cache.counts()[:3] == [8, 0, 0]
    records = [json.loads(line) for line in (tmp_path / "run/training.jsonl").open()]
    assert_same_training(resumed, [r["loss"] for r in records], uncached)
    assert records[-1]["vision_cache_hits"] == 8 and records[-1]["vision_cache_computed"] == 0


def test_cache_features_fills_the_disk_cache_a_run_then_reads(
    tmp_path, tiny_gemma3, receipts, uncached, capsys
):
    import yaml

    from automodel.cli import main
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    store = tmp_path / "features"
    cache = {"enabled": True, "storage": "disk", "path": str(store)}
    cfg = config(tiny_gemma3, receipts, tmp_path / "run", vision_cache=cache, **CACHE_RUN)
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["data", "cache-features", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dataset: 8 images, 8 computed, 0 already cached" in out
    assert "vision cache: 0 hits, 8 computed, 8 stored (" in out and str(store) in out

    recipe = FinetuneRecipeForVLM(cfg)
    recipe.setup()
    embedded = count_tower_images(recipe)
    recipe.train()
    assert sum(embedded) == 0  # the tower never ran: every image of both epochs came from disk
    assert "vision cache: 16 hits, 0 computed, 0 stored" in capsys.readouterr().out
    lines = (tmp_path / "run" / "training.jsonl").read_text().splitlines()
    assert_same_training(recipe, [json.loads(line)["loss"] for line in lines], uncached)

    assert main(["data", "cache-features", "-c", str(path), "--vision_cache.storage=memory"]) == 2
    assert "set vision_cache.enabled=true and vision_cache.storage=disk" in capsys.readouterr().err


def test_vision_cache_keys_change_with_the_tower_and_its_precision(tmp_path, tiny_gemma3):
    from automodel.models import AutoModelForImageTextToText
    from automodel.models.vision_cache import DiskStore, VisionCache

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_gemma3)).eval()
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    size = tower.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = tower(pixel_values=pixels).last_hidden_state

    def run(**autocast) -> tuple[torch.Tensor, list[int], Path]:
        """The tower's output through a fresh cache; its hits and computed; its folder."""
        cache = VisionCache(tower, DiskStore(tmp_path))
        with torch.autocast("cpu", enabled=bool(autocast), **autocast):
            out = tower(pixel_values=pixels).last_hidden_state
        cache.close()
        return out, cache.counts()[:2], cache.store.folder

    out, counts, _ = run()
    assert counts == [0, 2] and torch.equal(out, expected)
    out, counts, _ = run()
    assert counts == [2, 0] and torch.equal(out, expected)  # read back from disk
    assert run(dtype=torch.bfloat16)[1] == [0, 2]  # another autocast dtype: other values
    with torch.no_grad():
        tower.post_layernorm.bias.add_(1e-3)
    out, counts, folder = run()
    assert counts == [0, 2] and not torch.equal(out, expected)  # new weights: no stale reuse
    assert len(list(tmp_path.glob("*/tower.json"))) == 2  # one folder per tower

    entry = next(folder.glob("*/*.safetensors"))
    entry.write_bytes(b"torn")  # unreadable: computed again and rewritten
    (entry.parent / f"{entry.name}.123.abcd.tmp").write_bytes(b"left by a killed writer")
    assert run()[1] == [1, 1] and run()[1] == [2, 0]
    tower.config._attn_implementation = "eager"  # sdpa and eager differ in the last bits
    assert run()[1] == [0, 2]


def test_vision_cache_refuses_a_training_tower(tmp_path, tiny_gemma3, receipts):
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    cfg = config(
        tiny_gemma3,
        receipts,
        tmp_path,
        vision_cache={"enabled": True},
        freeze_config={"freeze_vision_tower": False},
    )
    recipe = FinetuneRecipeForVLM(cfg)
    with pytest.raises(UsageError, match="frozen vision tower"):
        recipe.setup()


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("pack_length", [None, 64])
def test_packing_gives_the_same_loss(tmp_path, tiny_gemma3, receipts, pack_length):
    _, plain = train(config(tiny_gemma3, receipts, tmp_path / "plain"))
    packing = {"enabled": True, "pack_length": pack_length}
    recipe, packed = train(config(tiny_gemma3, receipts, tmp_path / "packed", packing=packing))
    assert recipe.train_module.packer.pack_length == pack_length
    assert packed == pytest.approx(plain, rel=1e-5)


# --------------------------------------------------------------------------- data wait
class SlowLoader:
    """The recipe's loader with ``delay`` seconds before each batch (a data pipeline too slow)."""

    def __init__(self, loader, delay: float):
        self.loader, self.delay, self.sampler = loader, delay, loader.sampler

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_time_waiting_for_data_is_logged_and_hinted(tmp_path, tiny_gemma3, receipts, capsys):
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    cfg = config(tiny_gemma3, receipts, tmp_path, steps=2)
    recipe = FinetuneRecipeForVLM(cfg)
    recipe.setup()
    recipe.train_loader = SlowLoader(recipe.train_loader, delay=1.0)
    recipe.train()
    lines = (tmp_path / "training.jsonl").read_text().splitlines()
    waits = [json.loads(line)["data_wait_pct"] for line in lines]
    # Two micro-batches per step, 2 s of waiting against a tiny model's step.
    assert len(waits) == 2 and all(60 < w <= 100 for w in waits), waits
    assert recipe.data_wait.total >= 4.0
    out = capsys.readouterr().out
    assert out.count("the training loop waited for data") == 1  # once per run
    assert "dataloader.num_workers (now 0)" in out and re.search(r"\| data \d+% \|", out)


def test_training_workers_persist_across_epochs(tmp_path, tiny_gemma3, receipts):
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM

    cfg = config(tiny_gemma3, receipts, tmp_path, dataloader={"num_workers": 1})
    cfg["validation_dataset"] = dict(cfg["dataset"])
    cfg["validation_dataloader"] = {
        "_target_": "torchdata.stateful_dataloader.StatefulDataLoader",
        "num_workers": 1,
    }
    recipe = FinetuneRecipeForVLM(cfg)
    recipe.setup()
    assert recipe.train_loader.persistent_workers
    assert not recipe.val_loader.persistent_workers  # no idle processes between validations
    cfg["dataloader"]["persistent_workers"] = False  # the config still decides when it says
    recipe = FinetuneRecipeForVLM(cfg)
    recipe.setup()
    assert not recipe.train_loader.persistent_workers


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_gives_the_same_loss(tmp_path, tiny_gemma3, receipts):
    _, plain = train(config(tiny_gemma3, receipts, tmp_path / "plain", steps=2))
    compiled_cfg = config(tiny_gemma3, receipts, tmp_path / "compiled", steps=2)
    compiled_cfg["compile"] = {"enabled": True}
    _, compiled = train(compiled_cfg)
    assert compiled == pytest.approx(plain, rel=1e-4)


# --------------------------------------------------------------------------- fp32 attention
def test_cpu_attention_runs_in_fp32_under_bf16_autocast(
    tmp_path, tiny_gemma3, receipts, monkeypatch
):
    from automodel.models import attention, forward

    # bf16 autocast runs here even on a CPU without native bf16 (slow there, but the twin is tiny).
    monkeypatch.setattr(forward, "cpu_has_fast_matmul", lambda dtype: True)
    seen = []

    def recording(module, query, *args, **kwargs):
        seen.append(query.dtype)
        return sdpa(module, query, *args, **kwargs)

    sdpa = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", recording)
    losses = {}
    for name, switch in (("fp32", True), ("bf16", False)):
        cfg = config(tiny_gemma3, receipts, tmp_path / name, steps=2)
        cfg["precision"] = {"autocast": "bf16", "fp32_attention_on_cpu": switch}
        seen.clear()
        _, losses[name] = train(cfg)
        # Off: the decoder's attention takes bf16 (the frozen tower may run outside autocast).
        assert seen and (torch.bfloat16 in seen) != switch
    seen.clear()
    _, losses["none"] = train(config(tiny_gemma3, receipts, tmp_path / "none", steps=2))
    assert set(seen) == {torch.float32}  # no autocast: attention untouched, in fp32
    # The same loss within bf16's precision, with or without the switch.
    assert losses["fp32"] == pytest.approx(losses["bf16"], rel=1e-2)
    assert losses["fp32"] == pytest.approx(losses["none"], rel=1e-2)


def test_cpu_autocast_is_refused_where_torch_multiplies_in_its_slow_fallback():
    """bf16 / fp16 autocast on a CPU runs only where torch has native matrix products for it;
    elsewhere (an AVX2-only CPU) its fallback multiplies many times slower than fp32."""
    from automodel.models.forward import autocast_dtype, cpu_has_fast_matmul

    def fastest(x: torch.Tensor) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    cpu, a = torch.device("cpu"), torch.randn(128, 128)
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if cpu_has_fast_matmul(dtype):
            assert autocast_dtype(mode, cpu) is dtype
            continue
        # Why it is refused (measured on an AVX2-only CPU: 100x and more at this size).
        assert fastest(a.to(dtype)) > 3 * fastest(a)
        with pytest.raises(UsageError, match=rf"^precision.autocast={mode}: this CPU has no "):
            autocast_dtype(mode, cpu)
    assert autocast_dtype("auto", cpu) is None  # auto never asks a CPU for bf16


def test_cpu_autocast_refusal_is_one_line_before_anything_loads(
    tmp_path, receipts, monkeypatch, capsys
):
    from automodel.cli import main
    from automodel.models import forward

    monkeypatch.setattr(forward, "cpu_has_fast_matmul", lambda dtype: False)
    cfg = config(tmp_path / "no-model", receipts, tmp_path / "run", precision={"autocast": "bf16"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "vlm", "-c", str(tmp_path / "run.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: precision.autocast=bf16: "), lines
    assert lines[0].endswith("set precision.autocast=none")
    assert not (tmp_path / "run").exists()  # no run folder, no model loaded


# --------------------------------------------------------------------------- the benchmark
def test_the_headline_twin_is_gemma3_4b_scaled_with_its_tower_share():
    from benchmarks.shapes import GEMMA3_4B, HEADLINE_TWIN, HEADLINE_VOCAB, tower_to_decoder

    # Widths and the decoder's depth divided by 8; image and tokens kept.
    for key in ("hidden_size", "intermediate_size", "vision_hidden_size"):
        assert HEADLINE_TWIN[key] * 8 == GEMMA3_4B[key], key
    for heads in ("num_attention_heads", "num_key_value_heads"):
        width = HEADLINE_TWIN[heads] * HEADLINE_TWIN["head_dim"]
        assert width * 8 == GEMMA3_4B[heads] * GEMMA3_4B["head_dim"], heads
    assert round(GEMMA3_4B["num_hidden_layers"] / 8) == HEADLINE_TWIN["num_hidden_layers"]
    for key in ("image_size", "patch_size", "mm_tokens_per_image"):
        assert HEADLINE_TWIN[key] == GEMMA3_4B[key], key
    assert HEADLINE_VOCAB == 262_144
    # The tower's FLOPs on one image against the decoder's on its tokens: within 20% of the real
    # model's (about 2.7).
    real = tower_to_decoder(GEMMA3_4B, HEADLINE_VOCAB)
    assert 2.5 < real < 3.0
    assert abs(tower_to_decoder(HEADLINE_TWIN, HEADLINE_VOCAB) / real - 1) <= 0.2


@pytest.mark.parametrize("configs", ["lora,a", "c", ","])
def test_the_benchmark_refuses_mixed_or_unknown_configs(configs, monkeypatch, capsys):
    from benchmarks import vs_trl

    monkeypatch.setattr(sys, "argv", ["vs_trl.py", "--configs", configs])
    with pytest.raises(SystemExit) as stop:
        vs_trl.setting(vs_trl.parse_args())
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --configs {configs}: choose among")


def test_the_benchmark_headline_runs_three_epochs_in_bf16(monkeypatch):
    from benchmarks import vs_trl

    monkeypatch.setattr(sys, "argv", ["vs_trl.py"])
    args = vs_trl.parse_args()
    configs, sizes, _, words = vs_trl.setting(args)
    assert configs == ["lora", "full"] and sizes is vs_trl.HEADLINE_TWIN and args.bf16
    assert (args.warmup + args.steps) * args.global_batch == 3 * args.samples
    assert words == (90, 110)


def test_benchmark_against_trl_quick_run(tmp_path):
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "vs_trl.py"),
            "--quick",
            "--work",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup=\d+\.\d+ memory_ratio=\d+\.\d+", lines[-1])
    assert "'same_input_ids': True" in result.stdout
    assert "matrix products in fp32" in lines[0]
    # Neither side recomputes activations (TRL's SFTConfig would by default).
    assert result.stdout.count("'recompute': False") == 2
    assert "'recompute': True" not in result.stdout
    # The same optimizer kernel on both sides (SFTConfig's default is fused AdamW, as ours).
    assert result.stdout.count("'optimizer': 'AdamW+fused'") == 2
    counts = re.search(r"'trl_labels': (\d+), 'automodel_labels': (\d+)", result.stdout)
    assert counts and counts.group(1) == counts.group(2)
    # The per-phase profile of both sides: each phase measured, and together within the step.
    for side in ("automodel", "TRL"):
        row = re.search(rf"^  {side} +((?:-?\d+\.\d+ *){{8}})$", result.stdout, re.MULTILINE)
        assert row, result.stdout
        *phases, other, step = (float(x) for x in row.group(1).split())
        decoder, backward, optimizer = phases[1], phases[3], phases[4]
        assert min(phases) >= 0 and decoder > 0 and backward > 0 and optimizer > 0
        assert abs(sum(phases) + other - step) < 0.01 and sum(phases) <= 1.05 * step
    pipeline = re.search(
        r"data pipeline .*: (\d+\.\d) samples/s alone .* data (\d+\.\d)%", result.stdout
    )
    assert pipeline and float(pipeline.group(1)) > 0 and 0 <= float(pipeline.group(2)) <= 100


# --------------------------------------------------------------------------- host memory
def test_freed_buffers_go_back_to_the_system():
    # A fresh process each (the thresholds are process-wide). Freeing a 16 MB block raises
    # glibc's dynamic mmap threshold to 16 MB, so the 8 MB blocks come from the heap; freeing
    # every other one leaves holes the heap keeps resident, unless the threshold is fixed.
    code = """
import sys, torch
from automodel.training.host_memory import return_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "fixed":
    assert return_freed_memory()
torch.ones(16 << 20, dtype=torch.uint8)
before = rss_mb()
blocks = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(32)]
del blocks[::2]  # 128 MB freed, 128 MB kept
print(round(rss_mb() - before - 128))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kept = {}
    for mode in ("default", "fixed"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, env=env, check=True
        )
        kept[mode] = int(out.stdout.split()[-1])  # MB of the freed 128 still resident
    assert kept["default"] > 64 and kept["fixed"] < 16, kept
