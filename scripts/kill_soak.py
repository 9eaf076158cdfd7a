"""A kill soak: a run SIGKILLed many times, and rerun with the same command after each kill, ends
with the weights of a run never interrupted, bit for bit.

    python scripts/kill_soak.py                            # 60 steps, 10 kills, one process
    python scripts/kill_soak.py --nproc 2                  # 2 ranks (torchrun, gloo), 2 kills
    python scripts/kill_soak.py --kills 20 --seed 7 --work /tmp/soak

It builds the tiny Gemma 3 twin and the synthetic receipts as the tests do, under ``--work``
(a new temporary folder by default; kept, so the logs can be read), and runs the quickstart
recipe on them: 6 receipts, 2 samples a step, a loader worker, validation every 6 steps, a
checkpoint every 3 keeping the last 2 (so pruning and ``LOWEST_VAL`` are exercised too). First
an uninterrupted reference run; then the same command in a fresh ``checkpoint_dir``, killed with
SIGKILL at ``--kills`` moments and started again after each until it completes. Every third kill
(the 2nd, 5th, 8th, ...) waits for a checkpoint write in progress, polling ``checkpoint_dir``,
and kills at that instant; each such kill waits for the next of four moments of the write: the
``step_N.tmp`` folder made, its weights being written, its training state being written, and
the folder renamed with ``LATEST`` not replaced yet. The others kill at a random moment within
about a step after the run has logged a step drawn at random. A kill counts as mid-write when it
left a write half done: a ``*.tmp`` entry it created, or ``LATEST`` behind the newest step folder.

A kill stops every process of the run at once: the command's process group (with one process,
the trainer and its loader worker) and, under ``--nproc-per-node``, the group each rank leads
(torch's agent starts every rank in a session of its own: a SIGKILL to the command's group alone
leaves the ranks training on, orphaned). The groups are collected once the run has logged a
step, so that the kill itself is a few ``killpg`` calls in a row.

At the end the soaked run must match the reference exactly: every tensor of
``final_model/model.safetensors`` equal (``torch.equal``, no tolerance), ``training.jsonl`` and
``validation.jsonl`` with the same steps, once each, and equal values, and the same
``checkpoint_dir`` (the same step folders, ``LATEST`` and ``LOWEST_VAL``, no ``*.tmp`` debris).
Every run uses one thread per process (``OMP_NUM_THREADS=1``). The last line reads
``kill_soak: kills=10 mid_write=K steps=60 bitwise_equal=true same_folder=true``; the exit code
is 1 when either is false.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from automodel.training.checkpoint import MODEL_FILE, STEP_DIR
from automodel.training.state import TRAIN_STATE_FILE

QUICKSTART = ROOT / "examples/vlm/quickstart.yaml"
STEP_TMP = re.compile(r"^step_\d+\.tmp$")
POINTER_TMP = ("LATEST.tmp", "LOWEST_VAL.tmp", "BEST.tmp")
# The moments of a checkpoint write a mid-write kill waits for, in turn: the step folder made
# (step_N.tmp, empty), its weights being written, its training state being written, and the
# folder renamed with the pointers (LATEST, LOWEST_VAL) not replaced yet.
STAGES = ("created", "weights", "state", "pointers")
STAGE_FILES = {"weights": MODEL_FILE, "state": TRAIN_STATE_FILE}
STEP_LINE = re.compile(r"^step (\d+)/\d+ \|", re.MULTILINE)
RESUME_LINE = re.compile(r"^resuming from \S+ at step (\d+)/", re.MULTILINE)
MID_WRITE_EVERY = 3
ATTEMPT_TIMEOUT_S = 900
POLL_S = 0.0005  # a tiny twin's checkpoint takes tens of milliseconds to write


@dataclass
class Kill:
    """One SIGKILL: when it landed and what it interrupted."""

    attempt: int
    kind: str  # "random", or "mid_write:STAGE" (one of STAGES)
    resumed_from: int  # the step the killed attempt had resumed from (0: a fresh start)
    last_logged: int  # the last step the killed attempt had logged
    seconds: float  # after the attempt started
    interrupted: list[str] = field(default_factory=list)  # the writes it left half done

    @property
    def mid_write(self) -> bool:
        return bool(self.interrupted)

    def describe(self) -> str:
        where = "; ".join(self.interrupted) if self.interrupted else "left no write half done"
        return (
            f"kill {self.attempt + 1} ({self.kind}): {self.seconds:.1f}s after start, "
            f"resumed from step {self.resumed_from}, last logged step {self.last_logged}: {where}"
        )


@dataclass
class Soak:
    """What a soak did: its kills, the attempts' time, and how the result compares."""

    kills: list[Kill] = field(default_factory=list)
    reference_s: float = 0.0
    soak_s: float = 0.0
    problems: list[str] = field(default_factory=list)  # weights or logs that differ
    folder_problems: list[str] = field(default_factory=list)  # checkpoint_dir differences

    @property
    def mid_write(self) -> int:
        return sum(k.mid_write for k in self.kills)


def build_inputs(work: Path) -> tuple[Path, Path]:
    """The tiny Gemma 3 twin and the receipts, as tests/conftest.py builds them (reused)."""
    from automodel.demo.receipts import make_receipts
    from automodel.twins import make_tiny

    model = make_tiny("gemma3", work / "tiny-gemma3", seed=0, reuse=True)
    data = make_receipts(work / "receipts", n=16, val_n=8, test_n=8, reuse=True)
    return model, data


def command(model: Path, data: Path, out: Path, steps: int, nproc: int) -> list[str]:
    """The run's command line: the same for the reference and every attempt of the soak."""
    return [
        sys.executable,
        "-m",
        "automodel",
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
        f"--step_scheduler.max_steps={steps}",
        "--step_scheduler.global_batch_size=2",
        "--step_scheduler.local_batch_size=1",
        "--step_scheduler.log_every_steps=1",
        "--step_scheduler.val_every_steps=6",
        "--step_scheduler.ckpt_every_steps=3",
        "--checkpoint.keep_last_n=2",
        "--dataloader.num_workers=1",
        "--preview.num_samples=0",
        f"--checkpoint.checkpoint_dir={out}",
        *([f"--nproc-per-node={nproc}"] if nproc > 1 else []),
    ]


def environment() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"  # one thread: the same reduction order in every process
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Starts the command as the leader of a new process group, its output into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, env=environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def tmp_entries(directory: Path) -> dict[str, tuple[int, int]]:
    """``*.tmp`` entries of ``directory``: name -> (inode, ctime), which a rewrite changes."""
    found = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".tmp"):
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # renamed between listing and stat
                    found[entry.name] = (stat.st_ino, stat.st_ctime_ns)
    except FileNotFoundError:
        pass
    return found


def newest_step(directory: Path) -> str | None:
    """The newest renamed step folder's name."""
    names = [p.name for p in directory.glob("step_*") if STEP_DIR.match(p.name)]
    return max(names, default=None)


def latest(directory: Path) -> str | None:
    try:
        return (directory / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None


@dataclass
class Snapshot:
    """A ``checkpoint_dir`` before an attempt: what a write in progress is told apart from."""

    tmp: dict[str, tuple[int, int]]
    newest: str | None

    @classmethod
    def of(cls, directory: Path) -> Snapshot:
        return cls(tmp_entries(directory), newest_step(directory))

    def new_tmp(self, directory: Path) -> list[str]:
        return [n for n, key in tmp_entries(directory).items() if self.tmp.get(n) != key]

    def stages(self, directory: Path) -> set[str]:
        """The checkpoint-write stages in progress now (see STAGES)."""
        found = set()
        for name in self.new_tmp(directory):
            if STEP_TMP.match(name):
                found.add("created")
                try:
                    files = os.listdir(directory / name)
                except FileNotFoundError:
                    continue
                found |= {stage for stage, file in STAGE_FILES.items() if file in files}
            elif name in POINTER_TMP:
                found.add("pointers")
        newest = newest_step(directory)
        if newest != self.newest and latest(directory) != newest:
            found.add("pointers")  # renamed; LATEST not replaced yet
        return found

    def interrupted(self, directory: Path) -> list[str]:
        """What a killed attempt left half done: its ``*.tmp`` entries, and ``LATEST`` behind
        the newest step folder."""
        left = [describe_tmp(directory / name) for name in self.new_tmp(directory)]
        newest, named = newest_step(directory), latest(directory)
        if newest != self.newest and named != newest:
            left.append(f"{newest} renamed, LATEST still {named}")
        return left


def describe_tmp(path: Path) -> str:
    """A ``*.tmp`` entry and what it holds, e.g. ``step_000012.tmp [model.safetensors 13.7MB]``."""
    if not path.is_dir():
        return path.name
    files = []
    for child in sorted(path.iterdir()):
        try:
            files.append(f"{child.name} {child.stat().st_size / 1e6:.1f}MB")
        except FileNotFoundError:
            continue
    return f"{path.name} [{', '.join(files) or 'empty'}]"


def process_groups(proc: subprocess.Popen) -> set[int]:
    """The run's process groups: the command's own and the one each rank leads (with its loader
    workers, which a rank starts in its own group)."""
    groups = {proc.pid}
    try:
        members = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return groups
    for member in members:
        try:
            groups.add(os.getpgid(member.pid))
        except ProcessLookupError:
            continue
    return groups


def kill_run(proc: subprocess.Popen, groups: set[int]) -> None:
    """SIGKILL to every process of a run at once: each of its process groups (collected before
    the moment, so that no time passes between the kills). Raises if a process survives."""
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while left := [p.pid for p in psutil.process_iter() if _in_groups(p, groups)]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the killed run survived: {left}")
        time.sleep(0.01)


def _in_groups(process: psutil.Process, groups: set[int]) -> bool:
    """In one of ``groups`` and not a zombie (which a parent that died will never reap)."""
    try:
        return os.getpgid(process.pid) in groups and process.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False


def logged_steps(log: Path) -> list[int]:
    return [int(s) for s in STEP_LINE.findall(log.read_text(errors="replace"))]


def resumed_step(log: Path) -> int:
    found = RESUME_LINE.findall(log.read_text(errors="replace"))
    return int(found[0]) if found else 0


def wait_until(proc: subprocess.Popen, ready, deadline: float, poll: float) -> bool:
    """Polls ``ready()`` until it holds (True) or the process ends or the deadline passes."""
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def attempt(
    cmd: list[str],
    out: Path,
    log: Path,
    index: int,
    kind: str | None,
    steps: int,
    span: int,
    rng: random.Random,
) -> Kill | None:
    """Starts the command and, with ``kind`` ("random", or "mid_write:STAGE"), kills it (see
    the module docstring) and returns the kill; without, waits for it to end. Returns None
    when the run ended by itself.

    Raises:
        RuntimeError: the run failed (a nonzero exit nobody caused) or outlived its deadline.
    """
    before = Snapshot.of(out)
    started = time.monotonic()
    deadline = started + ATTEMPT_TIMEOUT_S
    proc = start(cmd, log)
    try:
        groups = None
        if kind is not None:
            groups = _wait_for_moment(proc, out, log, kind, steps, span, rng, before, deadline)
        if groups is not None:
            seconds = time.monotonic() - started
            kill_run(proc, groups)
            logged = logged_steps(log)
            return Kill(
                attempt=index,
                kind=kind,
                resumed_from=resumed_step(log),
                last_logged=logged[-1] if logged else 0,
                seconds=seconds,
                interrupted=before.interrupted(out),
            )
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{log} ran past {ATTEMPT_TIMEOUT_S}s") from None
    finally:
        if proc.poll() is None:
            kill_run(proc, process_groups(proc))
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{log.name} exited with code {code}:\n{tail}")
    return None


def _wait_for_moment(
    proc: subprocess.Popen,
    out: Path,
    log: Path,
    kind: str,
    steps: int,
    span: int,
    rng: random.Random,
    before: Snapshot,
    deadline: float,
) -> set[int] | None:
    """Waits for the moment to kill; returns the run's process groups then, or None when the
    run ended first.

    First a step the attempt logs, drawn from the next ``span`` (never the last two); then a
    random moment within about one step ("random"), or the checkpoint write's STAGE.
    """
    if not wait_until(proc, lambda: logged_steps(log), deadline, 0.02):
        return None
    groups = process_groups(proc)  # every rank runs once a step is logged
    first = logged_steps(log)[0]
    target = min(rng.randint(first, first + span), steps - 2)
    if not wait_until(proc, lambda: logged_steps(log)[-1] >= target, deadline, 0.02):
        return None
    if kind == "random":
        time.sleep(rng.uniform(0.0, 1.0))  # forward, backward, validation, a save, the loader
        return groups if proc.poll() is None else None
    stage = kind.split(":")[1]
    found = wait_until(proc, lambda: stage in before.stages(out), deadline, POLL_S)
    return groups if found else None


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def compare_runs(reference: Path, soaked: Path) -> list[str]:
    """Where the soaked run differs from the reference: weights (bitwise) and the JSON logs
    (the same steps, once each, and equal values)."""
    import torch
    from safetensors.torch import load_file

    problems = []
    ref = load_file(reference / "final_model" / "model.safetensors")
    res = load_file(soaked / "final_model" / "model.safetensors")
    if ref.keys() != res.keys():
        problems.append(f"final_model tensors differ: {sorted(ref.keys() ^ res.keys())[:3]}")
    for name in sorted(ref.keys() & res.keys()):
        a, b = ref[name], res[name]
        if a.dtype != b.dtype or not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else None
            problems.append(f"final_model {name} differs (max abs difference {diff})")
    for log, keys in (
        ("training.jsonl", ("loss", "lr", "grad_norm")),
        ("validation.jsonl", ("val_loss", "val_tokens")),
    ):
        ref_log, res_log = records(reference / log), records(soaked / log)
        ref_steps, res_steps = [r["step"] for r in ref_log], [r["step"] for r in res_log]
        if ref_steps != res_steps:
            problems.append(f"{log} steps differ: {res_steps} (reference {ref_steps})")
            continue
        for a, b in zip(ref_log, res_log):
            for key in keys:
                if a[key] != b[key]:
                    problems.append(f"{log} step {a['step']} {key}: {b[key]!r} != {a[key]!r}")
    return problems


def compare_folders(reference: Path, soaked: Path) -> list[str]:
    """The checkpoint_dir a soaked run leaves: the reference's step folders and pointers, and
    no ``*.tmp`` debris anywhere in it."""
    problems = []
    debris = sorted(str(p.relative_to(soaked)) for p in soaked.rglob("*.tmp"))
    if debris:
        problems.append(f"debris left in {soaked}: {debris}")
    ref_steps = sorted(p.name for p in reference.glob("step_*"))
    res_steps = sorted(p.name for p in soaked.glob("step_*") if not p.name.endswith(".tmp"))
    if ref_steps != res_steps:
        problems.append(f"step folders {res_steps} (reference {ref_steps})")
    for pointer in ("LATEST", "LOWEST_VAL"):
        a, b = (d / pointer for d in (reference, soaked))
        ref_text = a.read_text().strip() if a.is_file() else None
        res_text = b.read_text().strip() if b.is_file() else None
        if ref_text != res_text:
            problems.append(f"{pointer} names {res_text} (reference {ref_text})")
    return problems


def _reference(model: Path, data: Path, out: Path, steps: int, nproc: int) -> float:
    """The uninterrupted run; returns its seconds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    cmd = command(model, data, out, steps, nproc)
    attempt(cmd, out, out.parent / "run.log", 0, None, steps, 0, random.Random(0))
    return time.monotonic() - began


def _soak(
    soak: Soak,
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    kills: int,
    nproc: int,
    rng: random.Random,
    report: Callable[[str], None],
) -> None:
    """Runs the command, killing it ``kills`` times (see the module docstring), until it ends."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(model, data, out, steps, nproc)
    span = max(1, 2 * steps // (kills + 1))  # the kills spread over the whole run
    first_stage = rng.randrange(len(STAGES))
    for index in range(kills + 1):
        kind = None
        if index < kills:
            kind = "random"
            if index % MID_WRITE_EVERY == 1:  # the 2nd, 5th, 8th, ... kill
                stage = STAGES[(first_stage + index // MID_WRITE_EVERY) % len(STAGES)]
                kind = f"mid_write:{stage}"
        log = out.parent / f"attempt_{index + 1:02d}.log"
        kill = attempt(cmd, out, log, index, kind, steps, span, rng)
        if kill is None:
            return  # completed (before its kill, when it had one)
        soak.kills.append(kill)
        report(kill.describe())


def run_soak(
    work: Path,
    steps: int = 60,
    kills: int = 10,
    nproc: int = 1,
    seed: int = 0,
    model: Path | None = None,
    data: Path | None = None,
    report: Callable[[str], None] = print,
) -> Soak:
    """The reference run, then the killed-and-rerun one, compared; see the module docstring.

    Args:
        work: the folder for the twin, the data, both runs and their logs.
        model, data: a tiny Gemma 3 twin and receipts already built (else built under ``work``).
        report: where progress lines go.
    """
    work.mkdir(parents=True, exist_ok=True)
    if model is None or data is None:
        model, data = build_inputs(work)
    rng = random.Random(seed)
    soak = Soak()

    reference, soaked = work / "reference" / "checkpoints", work / "soak" / "checkpoints"
    try:
        soak.reference_s = _reference(model, data, reference, steps, nproc)
        report(f"reference: {steps} steps in {soak.reference_s:.0f}s")
        began = time.monotonic()
        _soak(soak, model, data, soaked, steps, kills, nproc, rng, report)
        soak.soak_s = time.monotonic() - began
    except RuntimeError as e:  # a run failed (a crash on restart) or hung: nothing to compare
        soak.problems.append(str(e))
        report(str(e))
        return soak
    report(f"soak: {len(soak.kills)} kills and {len(soak.kills) + 1} runs in {soak.soak_s:.0f}s")
    soak.problems = compare_runs(reference, soaked)
    soak.folder_problems = compare_folders(reference, soaked)
    for problem in soak.problems + soak.folder_problems:
        report(problem)
    return soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument(
        "--kills", type=int, default=None, help="SIGKILLs (default 10; 2 with --nproc 2)"
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun, gloo)")
    parser.add_argument("--seed", type=int, default=None, help="the kills' moments (random)")
    parser.add_argument("--work", type=Path, default=None, help="folder (a new temporary one)")
    args = parser.parse_args(argv)
    kills = args.kills if args.kills is not None else (10 if args.nproc == 1 else 2)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    work = args.work or Path(tempfile.mkdtemp(prefix="kill_soak."))
    print(f"kill_soak: work {work}, seed {seed}", flush=True)
    soak = run_soak(
        work, args.steps, kills, args.nproc, seed, report=lambda s: print(s, flush=True)
    )
    equal, same_folder = not soak.problems, not soak.folder_problems
    print(
        f"kill_soak: kills={len(soak.kills)} mid_write={soak.mid_write} steps={args.steps} "
        f"bitwise_equal={str(equal).lower()} same_folder={str(same_folder).lower()}"
    )
    return 0 if equal and same_folder else 1


if __name__ == "__main__":
    sys.exit(main())
