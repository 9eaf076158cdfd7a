"""Faults a long run survives: damaged checkpoints, a second run into the same folder, and
SIGTERM or SIGINT sent to the whole process group (loader workers and ranks included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from automodel.cli import main as cli_main
from automodel.errors import UsageError
from automodel.training.checkpoint import CheckpointManager, verify_dir
from automodel.training.run_lock import LOCK_FILE, STALE_AFTER_S, UNWRITTEN_S, RunLock
from automodel.training.signals import IgnoreStopSignals, StopOnSignal, workers_starting
from tests.conftest import ROOT, run_cli, start_cli
from tests.test_resume import finetune_args, ok, records


# ----------------------------------------------------------------------------- damaged checkpoints
def saved_run(directory: Path, steps=(3, 6, 9)) -> CheckpointManager:
    manager = CheckpointManager(directory)
    model = torch.nn.Linear(64, 64)
    for step in steps:
        torch.manual_seed(step)
        torch.nn.init.normal_(model.weight)
        manager.save(step, model, {"step": step}, {"a": 1})
    return manager


def truncate(step_dir: Path) -> None:
    path = step_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def flip_a_byte(step_dir: Path) -> None:
    path = step_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (truncate, "model.safetensors is 100 bytes"),
    "corrupted": (flip_a_byte, "model.safetensors does not match the SHA-256"),
    "missing_file": (lambda d: (d / "train_state.pt").unlink(), "train_state.pt is missing"),
    "no_completion_mark": (lambda d: (d / "meta.json").unlink(), "it has no meta.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumed(damage, tmp_path, capsys):
    manager = saved_run(tmp_path)
    assert verify_dir(tmp_path)[1]
    harm, words = DAMAGE[damage]
    harm(tmp_path / "step_000009")

    lines, intact = verify_dir(tmp_path)
    assert not intact and any(
        line.startswith("step_000009: DAMAGED") and words in line for line in lines
    ), lines
    assert "LATEST -> step_000009 (damaged)" in lines

    assert manager.find_resume() == tmp_path / "step_000006"
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path / 'step_000009'} is damaged ({words}" in out, out
    assert (tmp_path / "step_000009.damaged").is_dir()  # kept, out of the way
    assert (tmp_path / "LATEST").read_text().strip() == "step_000006"
    # The run goes on and writes step 9 again: it becomes the newest intact checkpoint.
    saved_run(tmp_path, steps=(9,))
    assert verify_dir(tmp_path)[1] and manager.find_resume() == tmp_path / "step_000009"


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_intact(tmp_path, capsys):
    manager = saved_run(tmp_path, steps=(3, 6))
    (tmp_path / "LATEST").write_text("step_000009\n")
    assert not verify_dir(tmp_path)[1]
    assert manager.find_resume() == tmp_path / "step_000006"
    assert "names step_000009, which is missing" in capsys.readouterr().out


def test_no_intact_checkpoint_never_starts_over_silently(tmp_path):
    manager = saved_run(tmp_path, steps=(3,))
    truncate(tmp_path / "step_000003")
    with pytest.raises(UsageError, match=r"no intact checkpoint .*step_000003.* delete .*LATEST"):
        manager.find_resume()
    # Everything is kept; the rerun still refuses (LATEST is the evidence of a run).
    assert (tmp_path / "step_000003.damaged").is_dir()
    with pytest.raises(UsageError, match="no intact checkpoint"):
        manager.find_resume()
    (tmp_path / "LATEST").unlink()  # the user chose to start over
    assert manager.find_resume() is None


def test_restore_from_a_damaged_checkpoint_is_refused(tmp_path):
    saved_run(tmp_path / "other", steps=(3,))
    flip_a_byte(tmp_path / "other" / "step_000003")
    with pytest.raises(UsageError, match="restore_from=.*is damaged"):
        CheckpointManager(tmp_path / "new").find_resume(str(tmp_path / "other"))


def test_checkpoints_verify_command(tmp_path, capsys):
    saved_run(tmp_path, steps=(3, 6))
    (tmp_path / "step_000009.tmp").mkdir()
    assert cli_main(["checkpoints", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step_000003: ok (3 files, SHA-256 match)" in out
    assert "step_000009.tmp: an unfinished write" in out and "LATEST -> step_000006 (ok)" in out
    truncate(tmp_path / "step_000003")
    assert cli_main(["checkpoints", "verify", str(tmp_path)]) == 1
    assert "step_000003: DAMAGED: model.safetensors is 100 bytes" in capsys.readouterr().out
    assert cli_main(["checkpoints", "verify", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one run per folder
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(directory: Path, pid: int, host: str, age_s: float = 0) -> Path:
    path = directory / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "then"}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    lock = RunLock(tmp_path)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    parent = os.getppid()  # a live process on this host: the test runner's parent
    write_lock(tmp_path, parent, socket.gethostname())
    with pytest.raises(UsageError, match=rf"in use by another run \(pid {parent} on "):
        RunLock(tmp_path)
    # A lock this very process left (a run inside Python that never released it) is its own.
    write_lock(tmp_path, os.getpid(), socket.gethostname())
    RunLock(tmp_path).release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    host = socket.gethostname()
    write_lock(tmp_path, dead_pid(), host)
    lock = RunLock(tmp_path)
    assert "took over the lock of a run that is gone" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    # Another host's lock: live while it is touched, stale once it is not.
    write_lock(tmp_path, 1, "another-host", age_s=10)
    with pytest.raises(UsageError, match="another-host.*taken over 300 s later"):
        RunLock(tmp_path)
    write_lock(tmp_path, 1, "another-host", age_s=STALE_AFTER_S + 1)
    RunLock(tmp_path).release()
    assert not list(tmp_path.glob(f"{LOCK_FILE}*"))
    # Left empty by a run killed between creating and writing it.
    (tmp_path / LOCK_FILE).write_text("")
    then = time.time() - UNWRITTEN_S - 1
    os.utime(tmp_path / LOCK_FILE, (then, then))
    RunLock(tmp_path).release()
    assert not list(tmp_path.glob(f"{LOCK_FILE}*"))


def test_a_concurrent_run_is_refused_through_the_cli(tmp_path, tiny_gemma3, receipts, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write_lock(out, os.getppid(), socket.gethostname())  # a live run: this test's parent
    code = cli_main(finetune_args(tiny_gemma3, receipts, out))
    err = capsys.readouterr().err
    assert code == 2 and f"{out} is in use by another run (pid {os.getppid()}" in err, err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written


# ----------------------------------------------------------------------------- signals
class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        time.sleep(0.01)
        return i


def test_loader_workers_leave_sigterm_and_sigint_to_the_main_process():
    loader = torch.utils.data.DataLoader(
        Slow(), num_workers=1, worker_init_fn=IgnoreStopSignals(), batch_size=2
    )
    with StopOnSignal() as stop:
        with workers_starting():
            batches = iter(loader)
        next(batches)
        worker = batches._workers[0]
        for sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(worker.pid, sig)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a first SIGINT after another signal: no effect
        for _ in range(5):
            next(batches)
        assert worker.is_alive() and stop.received == signal.SIGTERM
    del batches


def test_a_process_exits_with_its_loader_iterator_alive(tmp_path):
    # The iterator is still referenced at exit: multiprocessing's SIGTERM would not end its
    # worker, which ignores it.
    script = tmp_path / "leak.py"
    script.write_text(
        "import torch\n"
        "from automodel.training.signals import IgnoreStopSignals, workers_starting\n"
        "loader = torch.utils.data.DataLoader(\n"
        "    list(range(100)), num_workers=1, worker_init_fn=IgnoreStopSignals(), batch_size=2\n"
        ")\n"
        "with workers_starting():\n"
        "    batches = iter(loader)\n"
        "next(batches)\n"
        "print('ok', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-2000:]
    assert "Error" not in result.stderr, result.stderr[-2000:]  # no worker reported as killed


def test_a_second_ctrl_c_does_not_wait():
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [d for c in found for d in descendants(c)]


PHASES = {
    # phase: the step after which it runs (training: whose log line precedes the signal), and how
    # many processes a 1-rank run then has besides the main one (the training loader's worker,
    # plus the validation loader's).
    "training": (3, 1),
    "validation": (4, 2),
    "evaluation": (6, 1),
}


def group_signal_run(tmp_path, model, data, phase: str, sig: int, nproc: int):
    """Starts a run with a loader worker per rank, signals its whole process group once the
    given phase has started, and returns (exit code, output, checkpoint_dir, step)."""
    out = tmp_path / "out"
    step, extra_processes = PHASES[phase]
    args = finetune_args(
        model,
        data,
        out,
        "--dataloader.num_workers=1",
        "--step_scheduler.max_steps=40",
        "--step_scheduler.val_every_steps=4",
        "--step_scheduler.eval_every_steps=6",
        "--step_scheduler.log_every_steps=1",
        "--validation_dataset.limit=8",
        "--eval.max_samples=4",
        "--eval.batch_size=1",
        "--eval.max_new_tokens=32",
        *([f"--nproc-per-node={nproc}"] if nproc > 1 else []),
    )
    log = tmp_path / "run.log"
    proc = start_cli(*args, log=log, new_group=True)
    deadline = time.monotonic() + 600
    try:
        while f"step {step}/40 |" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        # The ranks and their workers (and the validation loader's) are running.
        while len(descendants(proc.pid)) < nproc * (1 + extra_processes) - (nproc == 1):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.002)
        os.killpg(proc.pid, sig)
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, log.read_text(), out, step, args


def assert_stopped_cleanly(code, output, out, step, sig):
    name = signal.Signals(sig).name
    assert code == 128 + sig, output[-3000:]
    assert output.count(f"stopped: {name} received at step {step};") == 1, output[-3000:]
    assert "Traceback" not in output and "killed by signal" not in output, output[-3000:]
    assert (out / "LATEST").read_text().strip() == f"step_{step:06d}"
    assert verify_dir(out)[1]
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase,sig,nproc",
    [
        pytest.param(phase, sig, nproc, id=f"{phase}-{sig.name}-{nproc}rank")
        for phase, sig, nproc in [
            ("training", signal.SIGINT, 1),
            ("validation", signal.SIGTERM, 1),
            ("evaluation", signal.SIGINT, 1),
            ("training", signal.SIGTERM, 2),
            ("validation", signal.SIGINT, 2),
            ("evaluation", signal.SIGTERM, 2),
        ]
    ],
)
def test_a_signal_to_the_process_group_checkpoints_and_stops(
    phase, sig, nproc, tmp_path, tiny_gemma3, receipts
):
    """Slurm's preemption, ``scancel``, ``timeout`` and Ctrl-C signal every process of the run;
    the run finishes the phase it is in (validation and evaluation are logged), checkpoints,
    exits 128 + the signal, and the same command resumes from there."""
    code, output, out, step, args = group_signal_run(
        tmp_path, tiny_gemma3, receipts, phase, sig, nproc
    )
    if phase == "training":  # the end of step 3 (just logged) or of step 4
        step = int(output.split(" received at step ")[-1].split(";")[0])
        assert step in (3, 4), output[-3000:]
    assert_stopped_cleanly(code, output, out, step, sig)
    if phase == "validation":
        assert [r["step"] for r in records(out / "validation.jsonl")][-1] == step
    if phase == "evaluation":
        assert f"eval step {step} (" in output
    if nproc == 2:
        resumed = ok(run_cli(*args[:-1], "--step_scheduler.max_steps=8", args[-1]))
        assert f"resuming from {out / f'step_{step:06d}'}" in resumed.stdout


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGTERM, id="SIGTERM"),
        pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow),
    ],
)
def test_a_signal_during_generation_keeps_the_finished_predictions(sig, tmp_path, tiny_gemma3):
    """``automodel generate`` over a folder writes its predictions batch by batch: a SIGTERM or
    Ctrl-C stops it without a traceback and the lines already written stay whole."""
    out = tmp_path / "preds.jsonl"
    log = tmp_path / "log"
    proc = start_cli(
        "generate",
        "--model",
        tiny_gemma3,
        "--image",
        ROOT / "examples/data/image_text/images",
        "--prompt",
        "Describe the shape.",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "48",
        "--out",
        out,
        log=log,
        new_group=True,
    )
    deadline = time.monotonic() + 300
    while not (out.is_file() and out.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)
    assert code in (-sig, 128 + sig), log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    lines = out.read_text().splitlines()
    assert 1 <= len(lines) < 9 and all(json.loads(line)["prediction"] is not None for line in lines)
