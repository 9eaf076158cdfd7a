"""End-to-end runs through the real CLI on the tiny Gemma 3 twin and synthetic receipts."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import ROOT, run_cli, run_python

QUICKSTART = ROOT / "examples/vlm/quickstart.yaml"
SEED_YAML = ROOT / "examples/vlm/gemma_3_vl_2b_cord_v2.yaml"
NEMO_YAML = ROOT / "examples/vlm/gemma3_vl_4b_cord_v2.yaml"


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory, tiny_gemma3, receipts):
    """A 3-step quickstart run with the model and data paths pointed at the session fixtures."""
    out = tmp_path_factory.mktemp("run")
    result = _ok(
        run_cli(
            "finetune",
            "vlm",
            "-c",
            QUICKSTART,
            "~prepare",
            f"--model.pretrained_model_name_or_path={tiny_gemma3}",
            f"--dataset.path_or_dataset={receipts}",
            f"--validation_dataset.path_or_dataset={receipts}",
            "--step_scheduler.max_steps=3",
            "--step_scheduler.global_batch_size=4",
            "--step_scheduler.local_batch_size=2",
            "--step_scheduler.log_every_steps=1",
            "--dataloader.num_workers=0",
            "--preview.num_samples=1",
            "--preview.max_new_tokens=8",
            f"--checkpoint.checkpoint_dir={out / 'checkpoints'}",
            "--print-config",
            cwd=out,
        )
    )
    return out / "checkpoints", result


def test_three_steps_write_a_complete_run(three_step_run):
    ckpt, result = three_step_run
    lines = [json.loads(x) for x in (ckpt / "training.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] >= 0
    assert "step 3/3 | loss" in result.stdout
    assert "reference:" in result.stdout
    # --print-config: the full resolved config first, then the summary.
    assert result.stdout.index("step_scheduler:\n") < result.stdout.index("\nmodel: ")
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert saved["step_scheduler"]["max_steps"] == 3 and "prepare" not in saved
    val = [json.loads(x) for x in (ckpt / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [0, 3]
    files = {p.name for p in (ckpt / "final_model").iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert name in files, f"{name} missing from final_model: {sorted(files)}"


def test_final_model_loads_and_generates_in_a_fresh_process(three_step_run, receipts):
    ckpt, _ = three_step_run
    code = f"""
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from safetensors.torch import load_file
path = {str(ckpt / "final_model")!r}
model = AutoModelForImageTextToText.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
# Weights on disk are the trained weights: they differ from a fresh twin's.
messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.new("RGB", (64, 64))}},
             {{"type": "text", "text": "Read this receipt."}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
assert out.shape[1] > inputs["input_ids"].shape[1]
# The tutorial's Step 5 class loads Gemma 3 too.
causal = AutoModelForCausalLM.from_pretrained(path)
assert type(causal).__name__ == "Gemma3ForConditionalGeneration", type(causal)
print("OK", type(model).__name__)
"""
    result = _ok(run_python(code))
    assert "OK Gemma3ForConditionalGeneration" in result.stdout


def test_final_model_weights_are_the_trained_ones(three_step_run, tiny_gemma3):
    from safetensors.torch import load_file

    ckpt, _ = three_step_run
    before = load_file(tiny_gemma3 / "model.safetensors")
    after = load_file(ckpt / "final_model" / "model.safetensors")
    assert before.keys() == after.keys(), "final_model uses the published key layout"
    changed = [k for k in before if not (before[k] == after[k]).all()]
    assert len(changed) > len(before) // 2


def test_generate_command(three_step_run, tmp_path):
    """The CLI prints the same greedy reply as generating in-process from the saved folder."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from automodel.generation import generate_reply

    ckpt, _ = three_step_run
    image = tmp_path / "receipt.png"
    Image.new("RGB", (80, 80), "white").save(image)
    result = _ok(
        run_cli(
            "generate",
            "--model",
            ckpt / "final_model",
            "--image",
            image,
            "--prompt",
            "Read this receipt.",
            "--max-new-tokens",
            "6",
        )
    )
    model = AutoModelForImageTextToText.from_pretrained(ckpt / "final_model")
    processor = AutoProcessor.from_pretrained(ckpt / "final_model")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(image).convert("RGB")},
                {"type": "text", "text": "Read this receipt."},
            ],
        }
    ]
    expected = generate_reply(model, processor, messages, max_new_tokens=6)
    assert result.stdout.rstrip("\n") == expected
    bad = run_cli(
        "generate",
        "--model",
        ckpt / "final_model",
        "--image",
        tmp_path / "none.png",
        "--prompt",
        "x",
    )
    assert bad.returncode == 2 and "image not found" in bad.stderr


def test_the_tutorials_yaml_runs_with_two_overrides(tmp_path, tiny_gemma3, receipts):
    result = _ok(
        run_cli(
            "finetune",
            "vlm",
            "-c",
            SEED_YAML,
            f"--model.pretrained_model_name_or_path={tiny_gemma3}",
            f"--data.path_or_dataset={receipts}",
            cwd=tmp_path,
        )
    )
    # 16 training receipts, batch 2 from data.batch_size: one epoch is 8 steps.
    assert "step 8/8" in result.stdout
    assert (tmp_path / "checkpoints" / "final_model" / "model.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "checkpoints" / "config.yaml").read_text())
    assert saved["dataset"]["image_size"] == 448
    assert saved["dataloader"]["collate_fn"]["max_length"] == 512


def test_a_nemo_automodel_config_runs_with_paths_changed(tmp_path, tiny_gemma3, receipts):
    result = _ok(
        run_cli(
            NEMO_YAML,  # the short form: automodel CONFIG.yaml
            f"--model.pretrained_model_name_or_path={tiny_gemma3}",
            f"--dataset.path_or_dataset={receipts}",
            f"--validation_dataset.path_or_dataset={receipts}",
            "--step_scheduler.max_steps=2",
            cwd=tmp_path,
        )
    )
    assert "step 2/2" in result.stdout
    assert (tmp_path / "vlm_checkpoints" / "final_model" / "config.json").is_file()


def test_a_run_opens_with_a_summary_not_the_config(tmp_path, tiny_gemma3, receipts):
    out = tmp_path / "ckpt"
    args = [
        "finetune", "vlm", "-c", QUICKSTART, "~prepare",
        f"--model.pretrained_model_name_or_path={tiny_gemma3}",
        f"--dataset.path_or_dataset={receipts}", "--dataset.limit=4",
        f"--validation_dataset.path_or_dataset={receipts}", "--validation_dataset.limit=2",
        "--step_scheduler.max_steps=1", "--step_scheduler.global_batch_size=4",
        "--step_scheduler.local_batch_size=2", "--step_scheduler.eval_every_steps=null",
        "--dataloader.num_workers=0", "--preview.num_samples=0",
        f"--checkpoint.checkpoint_dir={out}",
    ]  # fmt: skip
    result = _ok(run_cli(*args, cwd=tmp_path))
    lines = result.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("model: "))
    assert lines[start : start + 7] == [
        f"model: {tiny_gemma3} (gemma3)",
        f"data: 4 training samples from {receipts}; 2 validation samples",
        "steps: 1",
        "batch: 4 global = 2 local x 2 accumulation",
        lines[start + 4],
        "precision: float32 weights, autocast off",
        f"results: {out} (full config in {out / 'config.yaml'})",
    ]
    assert re.fullmatch(
        r"parameters: [\d,]+ trainable / [\d,]+ total \([\d.]+%\)", lines[start + 4]
    )
    assert "step_scheduler:" not in result.stdout  # the config is not printed ...
    assert "step_scheduler:" in (out / "config.yaml").read_text()  # ... but saved


def test_make_commands(tmp_path):
    _ok(run_cli("models", "make-tiny", "gemma3", tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").is_file()
    _ok(run_cli("data", "make-receipts", tmp_path / "r", "--n", "8"))
    assert (tmp_path / "r" / "data" / "validation-00000-of-00001.parquet").is_file()


def test_help():
    assert "finetune" in _ok(run_cli("--help")).stdout
    assert "overrides" in _ok(run_cli("finetune", "vlm", "--help")).stdout
    assert "make-tiny" in _ok(run_cli("models", "--help")).stdout


def _bad(result, *needles):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_gemma3, receipts):
    paths = [
        f"--model.pretrained_model_name_or_path={tiny_gemma3}",
        f"--data.path_or_dataset={receipts}",
    ]
    _bad(run_cli("finetune", "vlm", "-c", tmp_path / "missing.yaml"), "config file not found")
    _bad(
        run_cli("finetune", "vlm", "-c", SEED_YAML, *paths, "--optimizer.lrr=1"),
        "optimizer.lrr",
        "did you mean: lr",
    )
    _bad(
        run_cli("finetune", "vlm", "-c", SEED_YAML, *paths, "--data.batch_size=two"),
        "data.batch_size",
        "expects a number",
    )
    _bad(
        run_cli("finetune", "vlm", "-c", SEED_YAML, *paths, "--optimizer._target_=os.system"),
        "outside the allowed modules",
    )
    _bad(
        run_cli(
            "finetune",
            "vlm",
            "-c",
            SEED_YAML,
            paths[0],
            "--data.path_or_dataset=./nope",
            cwd=tmp_path,
        ),
        "./nope",
    )
    _bad(
        run_cli(
            "finetune",
            "vlm",
            "-c",
            SEED_YAML,
            paths[1],
            "--model.pretrained_model_name_or_path=./no-model",
            cwd=tmp_path,
        ),
        "model folder not found",
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  _target_: [unclosed\n")
    _bad(run_cli("finetune", "vlm", "-c", broken), "broken.yaml:", "invalid YAML")
