"""Data parallelism through the CLI on this CPU: 2 processes (gloo) train as 1 process does.

``automodel finetune vlm --nproc-per-node 2`` relaunches itself under torchrun. With the same
global batch, every step's loss must match the single-process run (SGD on purpose: Adam would
hide a wrong gradient scale), a checkpoint written by 2 ranks must resume exactly on 2 ranks,
and the 2-rank ``final_model`` must be an ordinary folder that loads in one process.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from automodel.twins import TWIN_FAMILIES
from tests.conftest import ROOT, run_cli, start_cli
from tests.test_resume import records

STEPS = 10
TOL = 1e-4


def _config(path: Path, model: Path, dataset: dict, out: Path, **changes) -> Path:
    cfg = {
        "model": {
            "_target_": "automodel.models.AutoModelForImageTextToText.from_pretrained",
            "pretrained_model_name_or_path": str(model),
        },
        "dataset": dataset,
        "dataloader": {
            "_target_": "torchdata.stateful_dataloader.StatefulDataLoader",
            "num_workers": 0,
        },
        "step_scheduler": {
            "global_batch_size": 4,
            "local_batch_size": 2,  # 1 process: 2 micro-batches per step; 2 processes: 1 each
            "max_steps": STEPS,
            "log_every_steps": 1,
            "ckpt_every_steps": 5,
        },
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.2},
        "lr_scheduler": {"lr_decay_style": "constant"},
        "checkpoint": {"checkpoint_dir": str(out)},
    }
    for dotted, value in changes.items():  # section__key=value, or section=a whole section
        if "__" not in dotted:
            cfg[dotted] = value
            continue
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg: Path, nproc: int, tmp_path: Path) -> list[float]:
    result = run_cli(
        "finetune",
        "vlm",
        "-c",
        cfg,
        f"--nproc-per-node={nproc}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = Path(yaml.safe_load(cfg.read_text())["checkpoint"]["checkpoint_dir"])
    lines = (out / "training.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == STEPS, (a, b)
    assert a[0] != a[-1], "the steps must change the model"
    assert max(abs(x - y) for x, y in zip(a, b)) < TOL, (a, b)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def receipts_cfg(receipts):
    return {
        "_target_": "automodel.datasets.vlm.make_cord_v2_dataset",
        "path_or_dataset": str(receipts),
        "split": "train",
    }


@pytest.fixture(scope="module")
def single(tiny_gemma3, receipts_cfg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    cfg = _config(tmp / "c.yaml", tiny_gemma3, receipts_cfg, tmp / "run")
    return _train(cfg, 1, tmp), tmp / "run"


def test_fsdp2_matches_one_process_and_resumes_on_two(single, tiny_gemma3, receipts_cfg, tmp_path):
    one_losses, one_run = single
    run = tmp_path / "run"
    # Validation at the checkpoint steps: a checkpoint right after it must find the sharded
    # parameters the optimizer holds, and the step-5 resume below (without validation) must
    # still end bit for bit the same.
    cfg = _config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        receipts_cfg,
        run,
        distributed__strategy="fsdp2",
        validation_dataset={**receipts_cfg, "split": "validation", "limit": 2},
        step_scheduler__val_every_steps=5,
    )
    losses = _train(cfg, 2, tmp_path)
    assert (run / "validation.jsonl").read_text().count("val_loss") == 3  # steps 0, 5, 10
    _close(one_losses, losses)

    # final_model: an ordinary folder with the same weights as the single-process run's.
    final, one_final = _weights(run / "final_model"), _weights(one_run / "final_model")
    assert final.keys() == one_final.keys()
    assert max((final[k] - one_final[k]).abs().max().item() for k in final) < TOL
    check = run_cli(
        "generate",
        "--model",
        run / "final_model",
        "--image",
        ROOT / "examples/data/conversation/images/red_circle.png",
        "--prompt",
        "Read this receipt.",
        "--max-new-tokens",
        "4",
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr[-2000:]

    # Resume the 2-rank step-5 checkpoint on 2 ranks: the same final weights, bit for bit.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / "step_000005", resumed / "step_000005")
    (resumed / "LATEST").write_text("step_000005\n")
    assert (resumed / "step_000005" / "train_state.rank1.pt").is_file()
    cfg2 = _config(
        tmp_path / "c2.yaml", tiny_gemma3, receipts_cfg, resumed, distributed__strategy="fsdp2"
    )
    _train(cfg2, 2, tmp_path)
    again = _weights(resumed / "final_model")
    assert all(torch.equal(again[k], final[k]) for k in final)

    # The same checkpoint refuses to resume in one process (each rank's data position is saved).
    refused = run_cli("finetune", "vlm", "-c", cfg2, cwd=tmp_path)
    assert refused.returncode == 2
    assert "written by 2 processes" in refused.stdout + refused.stderr


@pytest.mark.slow
def test_fsdp2_with_adamw_checkpoints_right_after_validation(tiny_gemma3, receipts_cfg, tmp_path):
    """A forward without backward (validation) leaves FSDP2's root and tower gathered; the
    checkpoint of the same step must still find AdamW's state under the model's parameters."""
    cfg = _config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        receipts_cfg,
        tmp_path / "run",
        distributed__strategy="fsdp2",
        step_scheduler__max_steps=2,
        step_scheduler__val_every_steps=1,
        step_scheduler__ckpt_every_steps=1,
        optimizer___target_="torch.optim.AdamW",
        optimizer__lr=1e-4,
        validation_dataset__split="validation",
        **{f"validation_dataset__{k}": v for k, v in receipts_cfg.items() if k != "split"},
    )
    _train(cfg, 2, tmp_path)
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "step_000002"
    assert len(records(tmp_path / "run" / "validation.jsonl")) == 3


def test_ddp_matches_one_process(single, tiny_gemma3, receipts_cfg, tmp_path):
    cfg = _config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        receipts_cfg,
        tmp_path / "run",
        distributed__strategy="ddp",
    )
    _close(single[0], _train(cfg, 2, tmp_path))


@pytest.fixture(scope="module")
def mixed_cfg(tmp_path_factory):
    """Even lines text-only, odd lines with an image: unshuffled, rank 0 gets only text."""
    folder = tmp_path_factory.mktemp("mixed")
    images = ROOT / "examples/data/conversation/images"
    lines = []
    for i, image in enumerate(sorted(images.iterdir())[:8] * 2):
        user = [{"type": "text", "text": f"Say the number {i}."}]
        if i % 2:
            user = [{"type": "image", "image": str(image)}, {"type": "text", "text": "Shape?"}]
        reply = [{"type": "text", "text": f"It is {image.stem.replace('_', ' ')} {i}."}]
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {
        "_target_": "automodel.datasets.vlm.make_conversation_dataset",
        "path_or_dataset": str(path),
    }


@pytest.fixture(scope="module")
def mixed_single(tiny_gemma3, mixed_cfg, tmp_path_factory):
    """``mixed_single(frozen)``: the single-process losses on the mixed data, run once each."""
    runs = {}

    def get(frozen: bool) -> list[float]:
        if frozen not in runs:
            tmp = tmp_path_factory.mktemp("mixed_single")
            cfg = _config(tmp / "c.yaml", tiny_gemma3, mixed_cfg, tmp / "run", **_mixed(frozen))
            runs[frozen] = _train(cfg, 1, tmp)
        return runs[frozen]

    return get


def _mixed(frozen: bool) -> dict:
    return {"dataloader__shuffle": False, "freeze_config__freeze_vision_tower": frozen}


@pytest.mark.parametrize(
    "strategy,frozen",
    [("fsdp2", False), ("ddp", False), pytest.param("fsdp2", True, marks=pytest.mark.slow)],
)
def test_a_rank_with_only_text_neither_hangs_nor_drifts(
    strategy, frozen, tiny_gemma3, mixed_cfg, mixed_single, tmp_path
):
    two = _config(
        tmp_path / "two.yaml",
        tiny_gemma3,
        mixed_cfg,
        tmp_path / "two",
        distributed__strategy=strategy,
        **_mixed(frozen),
    )
    _close(mixed_single(frozen), _train(two, 2, tmp_path))


@pytest.mark.slow
def test_lora_with_fsdp2_and_activation_checkpointing(tiny_gemma3, receipts_cfg, tmp_path):
    lora = {"peft__dim": 8, "peft__alpha": 16}
    one = _config(tmp_path / "one.yaml", tiny_gemma3, receipts_cfg, tmp_path / "one", **lora)
    two = _config(
        tmp_path / "two.yaml",
        tiny_gemma3,
        receipts_cfg,
        tmp_path / "two",
        distributed__strategy="fsdp2",
        distributed__activation_checkpointing=True,
        **lora,
    )
    _close(_train(one, 1, tmp_path), _train(two, 2, tmp_path))
    adapter = load_file(str(tmp_path / "two" / "final_adapter" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "one" / "final_adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == reference.keys() and adapter
    assert max((adapter[k] - reference[k]).abs().max().item() for k in adapter) < TOL


def test_distributed_settings_are_checked_before_anything_loads(tmp_path):
    for override, message in [
        ("--distributed.strategy=fsdp", "'fsdp' is not one of none, ddp, fsdp2"),
        ("--distributed.cpu_ofload=true", "cpu_offload"),
    ]:
        result = run_cli("validate", "-c", ROOT / "examples/vlm/quickstart.yaml", override)
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in result.stdout + result.stderr


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_step_and_the_run_resumes(
    tiny_gemma3, receipts_cfg, tmp_path
):
    run = tmp_path / "run"
    cfg = _config(
        tmp_path / "c.yaml",
        tiny_gemma3,
        receipts_cfg,
        run,
        step_scheduler__max_steps=400,
        step_scheduler__ckpt_every_steps=1000,
    )
    log = tmp_path / "log"
    proc = start_cli("finetune", "vlm", "-c", cfg, "--nproc-per-node=2", log=log)
    deadline = time.monotonic() + 300
    while "step 3/400" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    step_dir = run / (run / "LATEST").read_text().strip()
    assert (step_dir / "train_state.rank1.pt").is_file()
    assert log.read_text().count("stopped: SIGTERM received") == 1
    stopped_at = json.loads((step_dir / "meta.json").read_text())["step"]

    short = _config(
        tmp_path / "c2.yaml",
        tiny_gemma3,
        receipts_cfg,
        run,
        step_scheduler__max_steps=stopped_at + 2,
        step_scheduler__ckpt_every_steps=1000,
    )
    result = run_cli("finetune", "vlm", "-c", short, "--nproc-per-node=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {step_dir}" in result.stdout


# Every twin under FSDP2, and LLaVA under DDP too: it reads the tower's second-to-last layer,
# which leaves the last one without a gradient (frozen under DDP and FSDP2).
FAMILY_STRATEGIES = [(family, "fsdp2") for family in TWIN_FAMILIES] + [("llava", "ddp")]


@pytest.mark.slow
@pytest.mark.parametrize("family,strategy", FAMILY_STRATEGIES)
def test_every_family_with_a_text_only_rank(family, strategy, tiny_family, mixed_cfg, tmp_path):
    """Each family's 2-rank run, one rank holding only text-only samples, logs the losses of the
    single-process run (the tower runs on one rank only: FSDP2 must not hang on it). LLaVA
    records hidden states by class name (kept under FSDP2); Qwen2-VL has mRoPE; Qwen3-VL adds
    DeepStack mergers inside the tower unit; Qwen3.5 has linear-attention layers. Gemma 4's
    tower takes patches and their positions, and its decoder shares KV layers."""
    model = tiny_family(family)
    one = _config(tmp_path / "one.yaml", model, mixed_cfg, tmp_path / "one", **_mixed(False))
    two = _config(
        tmp_path / "two.yaml",
        model,
        mixed_cfg,
        tmp_path / "two",
        distributed__strategy=strategy,
        **_mixed(False),
    )
    _close(_train(one, 1, tmp_path), _train(two, 2, tmp_path))


def _image_conversations(path: Path, order: list[int]) -> dict:
    """16 conversations, each with an image, written in ``order``; unshuffled."""
    images = sorted((ROOT / "examples/data/conversation/images").iterdir())[:8] * 2
    lines = []
    for i in order:
        user = [{"type": "image", "image": str(images[i])}, {"type": "text", "text": "Shape?"}]
        reply = [{"type": "text", "text": f"It is {images[i].stem.replace('_', ' ')} {i}."}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    path.write_text("".join(lines))
    return {
        "_target_": "automodel.datasets.vlm.make_conversation_dataset",
        "path_or_dataset": str(path),
    }


@pytest.mark.parametrize("strategy", ["fsdp2", pytest.param("ddp", marks=pytest.mark.slow)])
def test_vision_loss_with_two_ranks_matches_one_process(strategy, tiny_gemma3, tmp_path):
    """The alignment loss is computed inside the data-parallel module, so it trains with 2 ranks.

    It contrasts the samples of one micro-batch, so the single process reads the same
    micro-batches: in step k, rank 0 holds samples 4k and 4k+2, rank 1 4k+1 and 4k+3, and the
    one process's file lists them in that order.
    """
    weighted = {"vision_loss__weight": 0.5, "dataloader__shuffle": False}
    ranks_order = list(range(16))
    one_order = [4 * k + j for k in range(4) for j in (0, 2, 1, 3)]
    one_data = _image_conversations(tmp_path / "one.jsonl", one_order)
    two_data = _image_conversations(tmp_path / "two.jsonl", ranks_order)
    one = _config(tmp_path / "one.yaml", tiny_gemma3, one_data, tmp_path / "one", **weighted)
    two = _config(
        tmp_path / "two.yaml",
        tiny_gemma3,
        two_data,
        tmp_path / "two",
        distributed__strategy=strategy,
        **weighted,
    )
    _close(_train(one, 1, tmp_path), _train(two, 2, tmp_path))
    records = {
        name: [json.loads(x) for x in (tmp_path / name / "training.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    for part in ("language_loss", "vision_loss"):
        one_part = [r[part] for r in records["one"]]
        assert max(abs(a - b) for a, b in zip(one_part, [r[part] for r in records["two"]])) < TOL
    final, one_final = (
        _weights(tmp_path / "two/final_model"),
        _weights(tmp_path / "one/final_model"),
    )
    assert max((final[k] - one_final[k]).abs().max().item() for k in final) < TOL
