"""Fine-tuning with LoRA through the CLI: adapter and merged outputs, adapter-only checkpoints,
and exact resume."""

from __future__ import annotations

import json
import signal

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli, run_python
from tests.test_resume import assert_same_run, finetune_args, interrupt, ok

LORA = (
    "--peft.r=4",
    "--peft.alpha=8",
    "--optimizer.lr=1e-2",
    "--step_scheduler.log_every_steps=1",
    "--step_scheduler.ckpt_every_steps=3",
    "--dataloader.num_workers=0",
)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_gemma3, receipts):
    out = tmp_path_factory.mktemp("lora") / "run"
    result = ok(run_cli(*finetune_args(tiny_gemma3, receipts, out, *LORA)))
    return out, result


def test_lora_run_writes_an_adapter_and_a_merged_model(lora_run, tiny_gemma3):
    out, result = lora_run
    assert "parameters: " in result.stdout
    trainable, total = (
        int(x.replace(",", ""))
        for x in result.stdout.split("parameters: ")[1].split(" total")[0].split(" trainable / ")
    )
    assert 0 < trainable < total / 10, "only the adapters train"
    config = json.loads((out / "final_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_gemma3)
    assert config["r"] == 4 and not any("vision" in t for t in config["target_modules"])
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "final_model" / "model.safetensors").is_file()
    merged = load_file(out / "final_model" / "model.safetensors")
    assert not any("lora_" in k for k in merged), "final_model is merged, without adapters"
    # Step checkpoints hold the adapters only; the frozen base comes from the model folder.
    step = load_file(out / "step_000003" / "model.safetensors")
    assert step and all("lora_" in k for k in step)


def test_adapter_on_base_equals_merged_model_in_a_fresh_process(lora_run, tiny_gemma3):
    out, _ = lora_run
    code = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText
ids = torch.tensor([[2, 4, 30, 31, 32, 33, 5]])
base = AutoModelForImageTextToText.from_pretrained({str(tiny_gemma3)!r})
adapted = PeftModel.from_pretrained(base, {str(out / "final_adapter")!r})
merged = AutoModelForImageTextToText.from_pretrained({str(out / "final_model")!r})
untouched = AutoModelForImageTextToText.from_pretrained({str(tiny_gemma3)!r})
with torch.no_grad():
    a, m, u = (x(input_ids=ids).logits for x in (adapted, merged, untouched))
assert torch.allclose(a, m, atol=1e-4), (a - m).abs().max()
assert not torch.allclose(u, m, atol=1e-4), "training changed nothing"
print("OK")
"""
    result = run_python(code)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_lora_resume_after_sigkill_is_exact(lora_run, tmp_path, tiny_gemma3, receipts):
    reference, _ = lora_run
    resumed = tmp_path / "resumed"
    args = finetune_args(tiny_gemma3, receipts, resumed, *LORA)
    code, output = interrupt(args, resumed, signal.SIGKILL)
    assert code == -signal.SIGKILL, output[-3000:]
    ok(run_cli(*args))
    assert_same_run(reference, resumed)
    ref = (reference / "final_adapter" / "adapter_model.safetensors").read_bytes()
    assert ref == (resumed / "final_adapter" / "adapter_model.safetensors").read_bytes()
