"""Runs that survive: killed or stopped runs resume, through the real CLI, to the same weights.

Each test compares an uninterrupted run with a run that is interrupted at a random step and then
rerun with the same command: ``final_model`` must hold the same weights and ``training.jsonl``
the same losses for every step, once each.

"The same" allows last-bit noise, nothing more: two fresh processes running the same command on
this CPU have, rarely, differed in the last bits from one step on (seen before any interruption:
a killed run's own step 4 against the reference's, loss 6.5237799 vs 6.5237818, weights by
~1e-7). Hence loss and validation loss within 1e-5 relative, grad norm within 1e-4 (the noise
grows over steps) and weights within 1e-5; the learning rate must be equal. A resume mistake is
far outside that: a skipped or repeated batch logs another batch's loss (this run's losses
differ by 4-7% from one step to the next), a scheduler off by a step logs another lr, and a
fresh AdamW state moves every weight by about the learning rate (1e-4 here).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automodel.cli import main as cli_main
from automodel.errors import UsageError
from automodel.twins import TWIN_FAMILIES
from tests.conftest import ROOT, run_cli, start_cli

QUICKSTART = ROOT / "examples/vlm/quickstart.yaml"
MAX_STEPS = 10

FAKE_WANDB = """
import json, os
def _record(*args):
    with open(os.environ["FAKE_TRACKER_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
class _Run:
    def log(self, data, step=None):
        _record("wandb.log", step, data)
    def finish(self):
        _record("wandb.finish")
def init(**kwargs):
    _record("wandb.init", {k: v for k, v in kwargs.items() if k != "config"}, "config" in kwargs)
    return _Run()
"""

FAKE_MLFLOW = """
import json, os
def _record(*args):
    with open(os.environ["FAKE_TRACKER_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
def set_tracking_uri(uri): _record("mlflow.set_tracking_uri", uri)
def get_experiment_by_name(name): return None
def create_experiment(name, artifact_location=None): _record("mlflow.create_experiment", name)
def set_experiment(name): _record("mlflow.set_experiment", name)
def start_run(run_name=None, tags=None): _record("mlflow.start_run", run_name, tags)
def log_dict(d, name): _record("mlflow.log_dict", name)
def log_metrics(metrics, step=None): _record("mlflow.log_metrics", step, metrics)
def end_run(): _record("mlflow.end_run")
"""


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A small run: 6 training receipts (3 steps an epoch), 2 micro-batches a step."""
    return [
        "finetune",
        "vlm",
        "-c",
        str(QUICKSTART),
        "~prepare",
        f"--model.pretrained_model_name_or_path={model}",
        f"--dataset.path_or_dataset={data}",
        "--dataset.limit=6",
        f"--validation_dataset.path_or_dataset={data}",
        "--validation_dataset.limit=4",
        f"--step_scheduler.max_steps={MAX_STEPS}",
        "--step_scheduler.global_batch_size=2",
        "--step_scheduler.local_batch_size=1",
        "--step_scheduler.val_every_steps=4",
        "--preview.num_samples=0",
        f"--checkpoint.checkpoint_dir={out}",
        *extra,
    ]


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def logged_steps(path: Path) -> int:
    """The last step in a JSON-lines log being written by another process (0 if none)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            continue  # a line still being written
    return 0


def interrupt(args: list[str], out: Path, send: int, env: dict | None = None) -> tuple[int, str]:
    """Starts a run and sends ``send`` to its whole process group (its loader workers too, as
    Slurm, ``timeout`` or Ctrl-C do) once a checkpoint exists and a random later step is logged.
    Returns the exit code and the run's output."""
    after = random.randint(4, MAX_STEPS - 3)
    log = out.with_name(out.name + ".log")
    proc = start_cli(*args, log=log, env=env, new_group=True)
    deadline = time.monotonic() + 300
    try:
        while (
            not ((out / "LATEST").is_file() and logged_steps(out / "training.jsonl") >= after)
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before step {after}:\n{log.read_text()[-3000:]}"
        os.killpg(proc.pid, send)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, log.read_text()


def assert_same_run(reference: Path, resumed: Path) -> None:
    ref_train, res_train = (
        records(reference / "training.jsonl"),
        records(resumed / "training.jsonl"),
    )
    steps = [r["step"] for r in res_train]
    assert steps == [r["step"] for r in ref_train], f"steps logged: {steps}"
    for ref, res in zip(ref_train, res_train, strict=True):
        assert ref["lr"] == res["lr"], f"step {ref['step']} lr: {ref['lr']} != {res['lr']}"
        for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4)):
            assert res[key] == pytest.approx(ref[key], rel=rel), f"step {ref['step']} {key}"
    ref_val, res_val = (
        records(reference / "validation.jsonl"),
        records(resumed / "validation.jsonl"),
    )
    assert [r["step"] for r in ref_val] == [r["step"] for r in res_val]
    for ref, res in zip(ref_val, res_val, strict=True):
        assert res["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5), f"val {ref['step']}"
    assert_same_weights(reference / "final_model", resumed / "final_model")


def assert_same_weights(reference: Path, other: Path) -> None:
    """The same tensor names, shapes and dtypes, and values within 1e-5 (see the docstring);
    infinities (Gemma 4's clipping bounds) in the same places."""
    import torch
    from safetensors.torch import load_file

    ref = load_file(reference / "model.safetensors")
    res = load_file(other / "model.safetensors")
    assert ref.keys() == res.keys()
    for name, tensor in ref.items():
        torch.testing.assert_close(
            res[name],
            tensor,
            rtol=0,
            atol=1e-5,
            msg=lambda m, name=name: f"final_model {name}: {m}",
        )


@pytest.fixture(scope="module")
def trackers(tmp_path_factory) -> tuple[Path, dict]:
    """Stand-ins for the wandb and mlflow packages (not installed), recording their calls."""
    root = tmp_path_factory.mktemp("trackers")
    (root / "fakes").mkdir()
    (root / "fakes" / "wandb.py").write_text(FAKE_WANDB)
    (root / "fakes" / "mlflow.py").write_text(FAKE_MLFLOW)
    return root / "calls.jsonl", {
        "PYTHONPATH": str(root / "fakes"),
        "FAKE_TRACKER_LOG": str(root / "calls.jsonl"),
    }


RUN = (
    "--step_scheduler.log_every_steps=1",
    "--step_scheduler.ckpt_every_steps=3",
    "--checkpoint.keep_last_n=2",
    "--dataloader.num_workers=0",
    "--wandb.project=receipts",
    "--wandb.name=tiny",
    "--mlflow.experiment_name=receipts",
    "--mlflow.tracking_uri=file:///tmp/nowhere",
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gemma3, receipts, trackers) -> Path:
    """An uninterrupted run, with W&B and MLflow sections (served by the stand-ins)."""
    out = tmp_path_factory.mktemp("reference") / "checkpoints"
    result = ok(run_cli(*finetune_args(tiny_gemma3, receipts, out, *RUN), env=trackers[1]))
    assert f"step {MAX_STEPS}/{MAX_STEPS} | loss" in result.stdout
    # This run's tracker calls alone (later runs append to the same file).
    (out / "tracker_calls.jsonl").write_text(trackers[0].read_text())
    return out


def test_a_run_writes_checkpoints_logs_and_trackers(reference):
    assert (reference / "LATEST").read_text().strip() == f"step_{MAX_STEPS:06d}"
    # Checkpoints at 3, 6, 9, 10; validation at 0, 4, 8, 10: only step 10 has both.
    assert sorted(p.name for p in reference.glob("step_*")) == ["step_000009", "step_000010"]
    assert (reference / "LOWEST_VAL").read_text().strip() == "step_000010"
    assert [r["step"] for r in records(reference / "validation.jsonl")] == [0, 4, 8, 10]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    png = (reference / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    made = records(reference / "tracker_calls.jsonl")
    wandb_init = next(c for c in made if c[0] == "wandb.init")
    assert wandb_init[1]["project"] == "receipts" and wandb_init[2] is True
    wandb_steps = [c[1] for c in made if c[0] == "wandb.log" and "train/loss" in c[2]]
    assert wandb_steps == list(range(1, MAX_STEPS + 1))
    mlflow_val = [
        c[1] for c in made if c[0] == "mlflow.log_metrics" and "validation/val_loss" in c[2]
    ]
    assert mlflow_val == [0, 4, 8, 10]
    assert ["wandb.finish"] in made and ["mlflow.end_run"] in made


def test_sigkill_then_rerun_gives_the_same_weights(
    reference, tmp_path, tiny_gemma3, receipts, trackers
):
    env = trackers[1]
    resumed = tmp_path / "resumed"
    args = finetune_args(tiny_gemma3, receipts, resumed, *RUN)
    code, output = interrupt(args, resumed, signal.SIGKILL, env)
    assert code == -signal.SIGKILL, output[-3000:]
    assert not (resumed / "final_model").exists()
    latest = (resumed / "LATEST").read_text().strip()
    # Debris of an interrupted save must never be resumed from, whatever its step.
    (resumed / "step_000099.tmp").mkdir()
    (resumed / "step_000099.tmp" / "model.safetensors").write_bytes(b"half")
    (resumed / "step_000098").mkdir()
    (resumed / "step_000098" / "meta.json").write_text('{"step": 98}')

    result = ok(run_cli(*args, env=env))
    assert (
        f"resuming from {resumed / latest} at step {int(latest[5:])}/{MAX_STEPS}" in result.stdout
    )
    assert not (resumed / "step_000099.tmp").exists()
    assert_same_run(reference, resumed)


def test_restore_from_another_runs_checkpoint(reference, tmp_path, tiny_gemma3, receipts, trackers):
    """A new checkpoint_dir that starts from step 9 of another run ends where that run ended."""
    second = tmp_path / "second"
    restore = f"--checkpoint.restore_from={reference / 'step_000009'}"
    args = finetune_args(tiny_gemma3, receipts, second, *RUN, restore)
    result = ok(run_cli(*args, env=trackers[1]))
    assert "at step 9/" in result.stdout
    train = records(second / "training.jsonl")
    last = [r for r in records(reference / "training.jsonl") if r["step"] == 10]
    assert [r["step"] for r in train] == [10]
    assert train[0]["loss"] == pytest.approx(last[0]["loss"], rel=1e-5)
    assert_same_weights(reference / "final_model", second / "final_model")

    bad = run_cli(
        *finetune_args(tiny_gemma3, receipts, tmp_path / "third", "--checkpoint.restore_from=nope")
    )
    assert bad.returncode == 2 and "checkpoint.restore_from=nope" in bad.stderr


def test_sigterm_saves_then_rerun_gives_the_same_weights(
    reference, tmp_path, tiny_gemma3, receipts, trackers
):
    """SIGTERM to the process group with a loader worker running: the worker leaves it to the
    main process, which finishes the step, checkpoints and exits 143."""
    resumed = tmp_path / "resumed"
    args = finetune_args(tiny_gemma3, receipts, resumed, *RUN, "--dataloader.num_workers=1")
    code, output = interrupt(args, resumed, signal.SIGTERM, trackers[1])
    assert code == 143, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    stopped = int(output.split("stopped: SIGTERM received at step ")[1].split(";")[0])
    assert (resumed / "LATEST").read_text().strip() == f"step_{stopped:06d}"
    assert "rerun the same command to resume" in output

    result = ok(run_cli(*args, env=trackers[1]))
    assert f"at step {stopped}/{MAX_STEPS}" in result.stdout
    assert_same_run(reference, resumed)


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(
    reference, tmp_path, tiny_gemma3, receipts, trackers
):
    """A node died while step 10 was copied elsewhere, or the disk filled: its weights file is
    truncated. The rerun names it, resumes from step 9 and ends with the reference's weights."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("step_000009", "step_000010"):
        shutil.copytree(reference / name, resumed / name)
    for name in ("LATEST", "training.jsonl", "validation.jsonl"):
        shutil.copy(reference / name, resumed / name)
    weights = resumed / "step_000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = ok(run_cli(*finetune_args(tiny_gemma3, receipts, resumed, *RUN), env=trackers[1]))
    assert f"checkpoint {resumed / 'step_000010'} is damaged (model.safetensors is" in result.stdout
    assert f"resuming from {resumed / 'step_000009'} at step 9/{MAX_STEPS}" in result.stdout
    assert (resumed / "step_000010.damaged").is_dir()
    assert_same_run(reference, resumed)


@pytest.mark.slow
def test_resume_with_a_worker_and_a_log_window_across_checkpoints(tmp_path, tiny_gemma3, receipts):
    """A data-loader worker; the loss logged every 2 steps, saved every 3 (mid-window)."""
    extra = (
        "--step_scheduler.log_every_steps=2",
        "--step_scheduler.ckpt_every_steps=3",
        "--dataloader.num_workers=1",
    )
    reference = tmp_path / "reference"
    ok(run_cli(*finetune_args(tiny_gemma3, receipts, reference, *extra)))
    resumed = tmp_path / "resumed"
    args = finetune_args(tiny_gemma3, receipts, resumed, *extra)
    code, output = interrupt(args, resumed, signal.SIGKILL)
    assert code == -signal.SIGKILL, output[-3000:]
    ok(run_cli(*args))
    assert_same_run(reference, resumed)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_gemma3, receipts):
    out = tmp_path / "out"
    # A learning rate this large overflows the weights after one update: every later loss is NaN.
    result = run_cli(
        *finetune_args(
            tiny_gemma3,
            receipts,
            out,
            "--optimizer.lr=1e38",
            "--step_scheduler.max_consecutive_nonfinite=3",
            "--step_scheduler.log_every_steps=1",
            "--dataloader.num_workers=0",
        )
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss or grad norm" in result.stderr
    assert "update skipped" in result.stdout
    train = records(out / "training.jsonl")
    last = train[-1]
    assert last["skipped_steps"] == 3 and last["step"] < MAX_STEPS
    assert (out / "LATEST").read_text().strip() == f"step_{last['step']:06d}"
    assert not (out / "final_model").exists()


def test_unwritable_or_full_checkpoint_dir(tmp_path, tiny_gemma3, receipts):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli(*finetune_args(tiny_gemma3, receipts, blocker / "ckpt"))
    assert result.returncode == 2 and "is not writable" in result.stderr, result.stderr

    # A file-size limit makes every large write fail as a full disk would (EFBIG).
    out = tmp_path / "full"
    args = finetune_args(
        tiny_gemma3,
        receipts,
        out,
        "--step_scheduler.ckpt_every_steps=2",
        "--dataloader.num_workers=0",
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            "bash",
            "-c",
            'ulimit -f 2048; exec "$@"',
            "bash",
            sys.executable,
            "-m",
            "automodel",
            *args,
        ],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "could not write checkpoint" in result.stderr and "step_000002" in result.stderr
    assert not (out / "LATEST").exists()
    assert not list(out.glob("step_*")), "a partial step folder was left behind"


def family_args(model: Path, data: Path, out: Path) -> list[str]:
    """4 steps of the quickstart on another twin: 6 receipts (a new epoch at step 4), batch 2,
    a checkpoint every 2 steps, every part of the model trained (its optimizer state saved),
    no length limit (Mistral 3's template adds a long system prompt), packing where the family
    allows it."""
    return [
        "finetune",
        "vlm",
        "-c",
        str(QUICKSTART),
        "~prepare",
        f"--model.pretrained_model_name_or_path={model}",
        f"--dataset.path_or_dataset={data}",
        "--dataset.limit=6",
        f"--validation_dataset.path_or_dataset={data}",
        "--validation_dataset.limit=2",
        "--step_scheduler.max_steps=4",
        "--step_scheduler.global_batch_size=2",
        "--step_scheduler.local_batch_size=2",
        "--step_scheduler.log_every_steps=1",
        "--step_scheduler.ckpt_every_steps=2",
        "--step_scheduler.val_every_steps=0",
        "--step_scheduler.eval_every_steps=0",
        "--freeze_config.freeze_vision_tower=false",
        f"--packing.enabled={str(packs(model)).lower()}",
        "--dataloader.num_workers=0",
        "~dataloader.collate_fn.max_length",
        "--preview.num_samples=0",
        f"--checkpoint.checkpoint_dir={out}",
    ]


def packs(model: Path) -> bool:
    """Whether packing takes the model (a family may refuse it: linear attention, convolutions)."""
    from transformers import AutoModelForImageTextToText

    from automodel.models.packing import Packer

    try:
        Packer(AutoModelForImageTextToText.from_pretrained(model))
    except UsageError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TWIN_FAMILIES))
def test_every_family_resumes_exactly(family, tiny_family, receipts, tmp_path, capsys):
    """Rerunning the command over what a run stopped after its step-2 checkpoint leaves (the
    reference's step-2 folder, ``LATEST`` naming it, and logs that ran past it) ends with the
    reference's losses and ``final_model`` weights. The restore runs in a fresh process from
    the checkpoint's files, strictly: every weight under its in-memory name (which for several
    families is not the layout ``save_pretrained`` writes) and the optimizer state by name.

    How a run gets stopped does not depend on the family (the SIGTERM and SIGKILL tests above
    cover it on Gemma 3) and costs a third process; what the family brings is its weights,
    their optimizer state (LLaVA's unread last tower layer has none), packing and data order.
    """
    reference = tmp_path / "reference"  # in this process: only the resumed run must be fresh
    assert cli_main(family_args(tiny_family(family), receipts, reference)) == 0, capsys.readouterr()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "step_000002", resumed / "step_000002")
    (resumed / "LATEST").write_text("step_000002\n")
    for log in ("training.jsonl", "validation.jsonl"):  # a stopped run's logs, past step 2 too
        shutil.copy(reference / log, resumed / log)
    result = ok(run_cli(*family_args(tiny_family(family), receipts, resumed)))
    assert f"resuming from {resumed / 'step_000002'} at step 2/4" in result.stdout
    assert_same_run(reference, resumed)
