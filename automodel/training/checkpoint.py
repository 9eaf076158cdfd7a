"""Writing the run's outputs atomically: a folder appears complete or not at all.

A step checkpoint is a folder ``checkpoint_dir/step_000200/`` holding

- ``model.safetensors``: every weight under its in-memory name (``model.state_dict()`` keys),
  so it loads back strictly into the same model object; ``save_pretrained`` would write the
  published layout, which ``load_state_dict`` does not match for Gemma 3 and others;
- ``train_state.pt``: optimizer, lr scheduler, every RNG, the data loader's position, counters
  (``train_state.rank<N>.pt``: another rank's own part);
- ``config.yaml``: the resolved config;
- ``meta.json``, written last, the folder's completion mark: the step, its validation loss, and
  the size and SHA-256 of every other file in it.

It is written as ``step_000200.tmp/`` and renamed when complete; ``LATEST`` (a one-line file
naming the folder) is replaced atomically after that, so a crash at any moment leaves either the
previous checkpoint or the new one, never half of one. ``LOWEST_VAL`` names the checkpoint with the
lowest validation loss among those written at a validation step.

A folder damaged afterwards (a node dying mid-copy, a full disk, a file deleted) is found by
``verify_step`` before a resume: the run names it and continues from the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from automodel.common import print0
from automodel.config.loader import dump_yaml, load_yaml
from automodel.distributed.env import all_ranks_error, from_rank0, rank_and_world_size
from automodel.errors import RunStopped, UsageError
from automodel.training.state import TRAIN_STATE_FILE, save_train_state

MODEL_FILE = "model.safetensors"
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)
META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED_FILES = (MODEL_FILE, TRAIN_STATE_FILE, META_FILE)


def check_writable(directory: str | Path) -> Path:
    """Creates ``directory`` and proves a file can be written there, before training starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test.{os.getpid()}"  # one per process: ranks run this too
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"checkpoint.checkpoint_dir {directory} is not writable ({e.strerror}); choose another"
        ) from None
    return directory


def save_config(cfg: dict, directory: str | Path) -> Path:
    path = Path(directory) / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_yaml(cfg))
    tmp.replace(path)
    return path


def save_hf_folder(model, processor, out_dir: str | Path) -> Path:
    """Saves ``model`` and ``processor`` as an ordinary Hugging Face folder.

    The folder is written under a temporary name and renamed, so a crash mid-save never leaves
    a half-written ``final_model`` that looks complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _adapters_only(model: torch.nn.Module) -> bool:
    """Under LoRA a step checkpoint holds the adapters: the frozen base comes from its folder."""
    return hasattr(model, "peft_config")


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameters: each second name of a parameter -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full weights on the CPU under their in-memory names, each tied one once;
    only the trainable adapters of a PEFT model.

    Sharded (FSDP2) parameters are gathered: under data parallelism every rank must call this.
    """
    state = get_model_state_dict(model, options=FULL_ON_CPU)
    for alias in _aliases(model):
        state.pop(alias, None)
    if _adapters_only(model):
        names = _trainable_names(model)
        state = {k: v for k, v in state.items() if k in names}
    return {k: v.contiguous() for k, v in state.items()}


def load_model_weights(model: torch.nn.Module, step_dir: str | Path) -> None:
    """Loads a step checkpoint's weights into ``model`` (sharded or not); a missing or extra key
    is an error.

    Raises:
        UsageError: the file does not match the model (another model or another layout).
    """
    path = Path(step_dir) / MODEL_FILE
    try:
        saved, aliases = load_file(str(path)), _aliases(model)
        if _adapters_only(model):
            expected = _trainable_names(model)
        else:
            expected = set(get_model_state_dict(model).keys()) - set(aliases)
        missing, extra = sorted(expected - saved.keys()), sorted(saved.keys() - expected)
        if missing or extra:
            raise RuntimeError(f"keys differ (missing {missing[:1]}, unexpected {extra[:1]})")
        for alias, name in aliases.items():
            if name in saved:
                saved[alias] = saved[name]
        set_model_state_dict(
            model, saved, options=StateDictOptions(full_state_dict=True, strict=False)
        )
    except (RuntimeError, OSError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(
            f"{path} does not match this model ({first}); resume with the config that wrote it"
        ) from None


class OptimizerState:
    """The optimizer's state keyed by parameter name, gathered whole (FSDP2 shards included),
    so it saves from rank 0 and loads on any rank.

    Args:
        model: the model whose parameters the optimizer updates (names come from it).
        optimizer: the optimizer.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=FULL_ON_CPU)

    def load_state_dict(self, state: dict) -> None:
        tensors = [v for per_param in state["state"].values() for v in per_param.values()]
        if not any(torch.is_tensor(t) and t.dim() > 0 for t in tensors):
            # A stateless optimizer (plain SGD): only the hyperparameters (the lr) to restore;
            # torch's loader cannot place an empty state on a device.
            for group, saved in zip(self.optimizer.param_groups, state["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
            return
        # A parameter that had no gradient before the checkpoint (LLaVA's last tower layer,
        # which the model never reads) is listed without state, as the optimizer holds it;
        # torch's strict check refuses that, so it stays on only when every listed one has state.
        listed = {name for group in state["param_groups"] for name in group["params"]}
        strict = listed <= set(state["state"])
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            state,
            options=StateDictOptions(full_state_dict=True, strict=strict),
        )


def read_meta(step_dir: str | Path) -> dict:
    """A step checkpoint's ``meta.json``: ``{"step", "val_loss", "world_size", "files"}``."""
    return json.loads((Path(step_dir) / META_FILE).read_text())


def load_saved_config(step_dir: str | Path) -> dict:
    """The resolved config a step checkpoint was written with."""
    return load_yaml(Path(step_dir) / "config.yaml")


def _attempt(write) -> str | None:
    """Runs ``write``; returns None, or the one-line reason it failed."""
    try:
        write()
    except (OSError, RuntimeError, SafetensorError) as e:  # torch's writer: RuntimeError
        return (getattr(e, "strerror", None) or str(e)).strip().splitlines()[0]
    return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(step_dir: Path) -> bool:
    """True for a renamed step folder holding every file a resume reads (not verified)."""
    return STEP_DIR.match(step_dir.name) is not None and all(
        (step_dir / name).is_file() for name in REQUIRED_FILES
    )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(directory: Path) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` for every file in ``directory`` but ``meta.json``."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != META_FILE
    }


def verify_step(step_dir: Path, hashes: bool = True) -> str | None:
    """What is wrong with a step folder, in a few words, or None when it is intact.

    Every file ``meta.json`` records must be there with its size and (``hashes``) its SHA-256.
    A folder written before sizes and hashes were recorded is checked for its files only.
    """
    if not step_dir.is_dir():
        return "the folder is missing"
    try:
        meta = read_meta(step_dir)
    except FileNotFoundError:
        return f"it has no {META_FILE}, the mark written last: its write never finished"
    except (OSError, ValueError) as e:
        return f"{META_FILE} is unreadable ({str(e).splitlines()[0]})"
    records = meta.get("files") or {name: None for name in REQUIRED_FILES if name != META_FILE}
    for name, record in records.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if record is None:
            continue
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{name} is {size} bytes, {record['bytes']} when written"
        if hashes and _sha256(path) != record["sha256"]:
            return f"{name} does not match the SHA-256 recorded when it was written"
    return None


def verify_dir(directory: str | Path) -> tuple[list[str], bool]:
    """A line for every step folder, unfinished write and pointer of a ``checkpoint_dir``, and
    whether all its step folders are intact and ``LATEST`` names one of them.

    Raises:
        UsageError: ``directory`` is not a folder, or holds no checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a folder: name a run's checkpoint.checkpoint_dir")
    steps = CheckpointManager(directory).step_folders()
    others = sorted(
        p for p in directory.glob("step_*") if p.is_dir() and STEP_DIR.match(p.name) is None
    )
    pointers = [directory / name for name in ("LATEST", "LOWEST_VAL", "BEST")]
    if not steps and not others and not pointers[0].is_file():
        raise UsageError(
            f"{directory} holds no step checkpoint (step_NNNNNN folders): name a run's "
            "checkpoint.checkpoint_dir"
        )
    lines, intact, states = [], True, {}
    for path in steps:
        problem = states[path.name] = verify_step(path)
        if problem is not None:
            intact = False
            lines.append(f"{path.name}: DAMAGED: {problem}")
        elif files := read_meta(path).get("files"):
            lines.append(f"{path.name}: ok ({len(files)} files, SHA-256 match)")
        else:
            lines.append(f"{path.name}: ok (written without hashes: its files are present)")
    for path in others:
        if path.name.endswith(".tmp"):
            lines.append(
                f"{path.name}: an unfinished write (never resumed; the next save removes it)"
            )
        else:
            lines.append(f"{path.name}: set aside (not resumed)")
    for pointer in pointers:
        if not pointer.is_file():
            continue
        name = pointer.read_text().strip()
        if name not in states:
            state = "missing"
            intact = intact and pointer.name != "LATEST"  # a resume falls back; others are notes
        else:
            state = "ok" if states[name] is None else "damaged"
        lines.append(f"{pointer.name} -> {name} ({state})")
    return lines, intact


def _move_aside(step_dir: Path) -> Path:
    """Renames a damaged step folder ``step_NNNNNN.damaged`` (``.damaged2``... if taken)."""
    for n in range(1, 1000):
        aside = step_dir.with_name(f"{step_dir.name}.damaged{n if n > 1 else ''}")
        if not aside.exists():
            step_dir.rename(aside)
            return aside
    raise UsageError(f"{step_dir.parent} holds too many damaged copies of {step_dir.name}")


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs, as ``key (old -> new)``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


class CheckpointManager:
    """Writes, finds and prunes the step checkpoints of one ``checkpoint_dir``.

    Args:
        checkpoint_dir: the run's output folder.
        keep_last_n: how many step checkpoints to keep (the one ``LOWEST_VAL`` names is kept as
            well); ``None`` keeps all.
        enabled: ``False`` writes nothing and resumes from nothing.
    """

    def __init__(
        self, checkpoint_dir: str | Path, keep_last_n: int | None = None, enabled: bool = True
    ):
        if keep_last_n is not None and keep_last_n < 1:
            raise UsageError(
                f"checkpoint.keep_last_n={keep_last_n}: keep at least 1, or null to keep all"
            )
        self.dir = Path(checkpoint_dir)
        self.keep_last_n = keep_last_n
        self.enabled = enabled

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}"

    def resume_hint(self, step: int) -> str:
        """What a user reads when a run stops at ``step`` after saving it."""
        if not self.enabled:
            return "nothing was saved (checkpoint.enabled is false)"
        return f"saved {self.step_dir(step)}: rerun the same command to resume"

    def pointer(self, name: str) -> Path | None:
        """The folder a pointer file (``LATEST``, ``LOWEST_VAL``) names, if it exists."""
        path = self.dir / name
        if not path.is_file():
            return None
        target = self.dir / path.read_text().strip()
        return target if is_complete(target) else None

    def step_folders(self) -> list[Path]:
        """Every ``step_NNNNNN`` folder, intact or not, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def complete_steps(self) -> list[Path]:
        """Step folders holding every file a resume reads, oldest first (not verified)."""
        return [p for p in self.step_folders() if is_complete(p)]

    def find_resume(self, restore_from: str | None = None) -> Path | None:
        """The checkpoint a run continues from.

        The run's own newest intact step folder comes first (rerunning a command continues it):
        the one ``LATEST`` names, or a newer one when a crash came between its rename and
        ``LATEST`` (rank 0 then finishes that save: ``_catch_up``). A damaged one (``verify_step``)
        is named, moved aside as ``step_NNNNNN.damaged``, and the one before it tried. Then
        ``restore_from``, which may name a step folder or another run's ``checkpoint_dir``.
        ``*.tmp`` folders are never candidates. Rank 0 reads and verifies; every rank gets its
        answer.

        Raises:
            UsageError: the folder holds checkpoints (or a ``LATEST``) but none is intact: the
                run never starts over silently; or ``restore_from`` is not an intact checkpoint.
        """
        if not self.enabled:
            return None
        own, error = from_rank0(self._newest_intact)
        if error:
            raise UsageError(error)
        if own is not None:
            if restore_from:
                print0(f"note: checkpoint.restore_from is ignored: {self.dir} has its own {own}")
            return self.dir / own
        if not restore_from:
            return None
        path = Path(restore_from)
        if (path / "LATEST").is_file():
            path = path / (path / "LATEST").read_text().strip()
        if STEP_DIR.match(path.name) is None or not path.is_dir():
            raise UsageError(
                f"checkpoint.restore_from={restore_from}: not a step checkpoint "
                f"(a step_NNNNNN folder with {MODEL_FILE}, {TRAIN_STATE_FILE} and {META_FILE}, "
                "or a checkpoint_dir with LATEST)"
            )
        problem = from_rank0(lambda: verify_step(path))
        if problem:
            raise UsageError(
                f"checkpoint.restore_from={restore_from}: {path} is damaged ({problem}); "
                "name an intact step folder (automodel checkpoints verify DIR lists them)"
            )
        return path

    def _newest_intact(self) -> tuple[str | None, str | None]:
        """(The newest intact step folder's name or None, an error or None), damaged folders
        moved aside on the way."""
        latest = self.dir / "LATEST"
        named = latest.read_text().strip() if latest.is_file() else None
        if named and not (self.dir / named).is_dir():
            print0(f"warning: {latest} names {named}, which is missing")
        damaged = []
        for path in reversed(self.step_folders()):
            problem = verify_step(path)
            if problem is None:
                self._catch_up(path)
                return path.name, None
            aside = _move_aside(path)
            damaged.append(path.name)
            print0(
                f"warning: checkpoint {path} is damaged ({problem}); moved aside as {aside.name}"
            )
        if damaged or named:
            return None, (
                f"{self.dir} holds no intact checkpoint to resume from "
                f"({', '.join(damaged) or named} damaged or missing): to start over, delete "
                f"{latest} or choose another checkpoint.checkpoint_dir"
            )
        return None, None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        train_state: dict,
        cfg: dict,
        val_loss: float | None = None,
        best: bool = False,
    ) -> Path | None:
        """Writes ``step_NNNNNN/`` atomically, then ``LATEST``, ``LOWEST_VAL``, ``BEST`` and pruning.

        Under data parallelism every rank calls this: the weights are gathered, rank 0 writes
        them with its ``train_state``, and every other rank writes its own part of the state
        (its data position, its random generators) as ``train_state.rank<N>.pt`` inside the
        folder before rank 0 renames it.

        Args:
            best: this step reached a new best ``eval.best_metric``: ``BEST`` names it.

        Returns:
            The step folder, or None when checkpointing is disabled.

        Raises:
            RunStopped: the folder could not be written (disk full, permissions) on any rank;
                the partial folder is removed and ``LATEST`` still names the previous one.
        """
        if not self.enabled:
            return None
        rank, world_size = rank_and_world_size()
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        weights = model_weights(model)  # a collective under FSDP2: before any early exit
        error = None
        if rank == 0:
            error = _attempt(lambda: self._begin(tmp, final))
        error = all_ranks_error(error)
        if error is None and rank > 0:
            error = _attempt(lambda: save_train_state(train_state, tmp, rank=rank))
        error = all_ranks_error(error)
        if error is None and rank == 0:
            error = _attempt(
                lambda: self._finish(
                    tmp, final, weights, train_state, cfg, step, val_loss, world_size
                )
            )
        error = all_ranks_error(error)
        if error is not None:
            self._abandon(tmp, final, error, rank)
        if rank == 0:
            self._update_pointers(final, val_loss, best)
        return final

    def _abandon(self, tmp: Path, final: Path, error: str, rank: int) -> None:
        """Removes a partial step folder and stops the run, naming the checkpoint to resume."""
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self.pointer("LATEST")
        raise RunStopped(
            f"could not write checkpoint {final} ({error}); LATEST still names "
            f"{previous.name if previous else 'no checkpoint'}: free space or fix "
            "checkpoint.checkpoint_dir, then rerun the same command to resume"
        )

    def _update_pointers(self, final: Path, val_loss: float | None, best: bool) -> None:
        """``LOWEST_VAL`` and ``BEST`` after a written step folder, then ``keep_last_n``."""
        if val_loss is not None:
            self._update_lowest_val(final, val_loss)
        if best:
            _write_atomic(self.dir / "BEST", final.name + "\n")
        self._prune()

    def _catch_up(self, step_dir: Path) -> None:
        """What a save of ``step_dir`` does after its rename (``LATEST``, ``LOWEST_VAL``,
        pruning), done again: a run killed in between never saves that step again, so its
        pointers would stay behind (at the last step, for good). ``LATEST`` also comes back
        from a folder found damaged or missing."""
        if self.pointer("LATEST") != step_dir:
            _write_atomic(self.dir / "LATEST", step_dir.name + "\n")
        self._update_pointers(step_dir, read_meta(step_dir)["val_loss"], best=False)

    def _begin(self, tmp: Path, final: Path) -> None:
        for stale in self.dir.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        # A folder half deleted by pruning, or one found damaged and not moved aside.
        shutil.rmtree(final, ignore_errors=True)
        tmp.mkdir(parents=True)

    def _finish(
        self,
        tmp: Path,
        final: Path,
        weights: dict,
        train_state: dict,
        cfg: dict,
        step: int,
        val_loss: float | None,
        world_size: int,
    ) -> None:
        save_file(weights, str(tmp / MODEL_FILE))
        _fsync_file(tmp / MODEL_FILE)
        save_train_state(train_state, tmp)
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
        _fsync_file(tmp / "config.yaml")
        meta = {"step": step, "val_loss": val_loss, "world_size": world_size}
        meta["files"] = file_records(tmp)  # every rank's files: they were written before this
        _write_atomic(tmp / META_FILE, json.dumps(meta))
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        _write_atomic(self.dir / "LATEST", final.name + "\n")

    def _update_lowest_val(self, step_dir: Path, val_loss: float) -> None:
        best = self.pointer("LOWEST_VAL")
        best_loss = read_meta(best)["val_loss"] if best else None
        if best_loss is None or val_loss < best_loss:
            _write_atomic(self.dir / "LOWEST_VAL", step_dir.name + "\n")

    def _prune(self) -> None:
        if self.keep_last_n is None:
            return
        keep = {self.pointer(name) for name in ("LATEST", "LOWEST_VAL", "BEST")}
        old = self.complete_steps()[: -self.keep_last_n]
        for path in old:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
