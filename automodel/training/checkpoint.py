"""Writing the run's outputs atomically: a folder appears complete or not at all.

A step checkpoint is a folder ``checkpoint_dir/step_000200/`` holding

- ``model.safetensors``: every weight under its in-memory name (``model.state_dict()`` keys),
  so it loads back strictly into the same model object; ``save_pretrained`` would write the
  published layout, which ``load_state_dict`` does not match for Gemma 3 and others;
- ``train_state.pt``: optimizer, lr scheduler, every RNG, the data loader's position, counters;
- ``config.yaml``: the resolved config; ``meta.json``: the step and its validation loss.

It is written as ``step_000200.tmp/`` and renamed when complete; ``LATEST`` (a one-line file
naming the folder) is replaced atomically after that, so a crash at any moment leaves either the
previous checkpoint or the new one, never half of one. ``LOWEST_VAL`` names the checkpoint with the
lowest validation loss among those written at a validation step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from automodel.config.loader import dump_yaml, load_yaml
from automodel.errors import UsageError
from automodel.training.metrics import print0
from automodel.training.signals import RunStopped
from automodel.training.state import TRAIN_STATE_FILE, save_train_state

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


def check_writable(directory: str | Path) -> Path:
    """Creates ``directory`` and proves a file can be written there, before training starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
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


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_model_weights(model: torch.nn.Module, path: Path) -> None:
    """The whole model (in-memory names), or only the trainable adapters of a PEFT model."""
    if _adapters_only(model):
        save_file({n: t.contiguous() for n, t in _trainable(model).items()}, str(path))
    else:
        save_model(model, str(path))


def load_model_weights(model: torch.nn.Module, step_dir: str | Path) -> None:
    """Loads a step checkpoint's weights into ``model``; a missing or extra key is an error.

    Raises:
        UsageError: the file does not match the model (another model or another layout).
    """
    path = Path(step_dir) / MODEL_FILE
    device = str(next(model.parameters()).device)
    try:
        if _adapters_only(model):
            saved, params = load_file(str(path), device=device), _trainable(model)
            if saved.keys() != params.keys():
                missing = sorted(params.keys() - saved.keys())[:1]
                extra = sorted(saved.keys() - params.keys())[:1]
                raise RuntimeError(f"adapter keys differ (missing {missing}, unexpected {extra})")
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)
            return
        load_model(model, path, strict=True, device=device)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(
            f"{path} does not match this model ({first}); resume with the config that wrote it"
        ) from None


def read_meta(step_dir: str | Path) -> dict:
    """A step checkpoint's ``meta.json``: ``{"step": int, "val_loss": float | None}``."""
    return json.loads((Path(step_dir) / META_FILE).read_text())


def load_saved_config(step_dir: str | Path) -> dict:
    """The resolved config a step checkpoint was written with."""
    return load_yaml(Path(step_dir) / "config.yaml")


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
    """True for a renamed step folder holding every file a resume reads."""
    return STEP_DIR.match(step_dir.name) is not None and all(
        (step_dir / name).is_file() for name in (MODEL_FILE, TRAIN_STATE_FILE, META_FILE)
    )


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

    def complete_steps(self) -> list[Path]:
        """Complete step folders, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and is_complete(p)]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def find_resume(self, restore_from: str | None = None) -> Path | None:
        """The checkpoint a run continues from.

        The run's own newest complete step folder comes first (rerunning a command continues it):
        the one ``LATEST`` names, or a newer one when a crash came between its rename and
        ``LATEST``. Then ``restore_from``, which may name a step folder or another run's
        ``checkpoint_dir``. ``*.tmp`` folders are never candidates.
        """
        if not self.enabled:
            return None
        own = (self.complete_steps() or [None])[-1]
        if own is not None:
            if restore_from:
                print0(
                    f"note: checkpoint.restore_from is ignored: {self.dir} has its own {own.name}"
                )
            return own
        if not restore_from:
            return None
        path = Path(restore_from)
        if (path / "LATEST").is_file():
            path = CheckpointManager(path).pointer("LATEST") or path
        if not is_complete(path):
            raise UsageError(
                f"checkpoint.restore_from={restore_from}: not a complete step checkpoint "
                f"(a step_NNNNNN folder with {MODEL_FILE}, {TRAIN_STATE_FILE} and {META_FILE}, "
                "or a checkpoint_dir with LATEST)"
            )
        return path

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

        Args:
            best: this step reached a new best ``eval.best_metric``: ``BEST`` names it.

        Returns:
            The step folder, or None when checkpointing is disabled.

        Raises:
            RunStopped: the folder could not be written (disk full, permissions); the partial
                folder is removed and ``LATEST`` still names the previous checkpoint.
        """
        if not self.enabled:
            return None
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            for stale in self.dir.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if not is_complete(final):  # complete already: written before a crash, same content
                shutil.rmtree(final, ignore_errors=True)  # a folder half deleted by pruning
                tmp.mkdir(parents=True)
                save_model_weights(model, tmp / MODEL_FILE)
                _fsync_file(tmp / MODEL_FILE)
                save_train_state(train_state, tmp)
                (tmp / "config.yaml").write_text(dump_yaml(cfg))
                _fsync_file(tmp / "config.yaml")
                _write_atomic(tmp / META_FILE, json.dumps({"step": step, "val_loss": val_loss}))
                os.rename(tmp, final)
                _fsync_dir(self.dir)
            _write_atomic(self.dir / "LATEST", final.name + "\n")
        except (OSError, RuntimeError, SafetensorError) as e:  # torch's writer: RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.pointer("LATEST")
            reason = (getattr(e, "strerror", None) or str(e)).strip().splitlines()[0]
            raise RunStopped(
                f"could not write checkpoint {final} ({reason}); LATEST still names "
                f"{previous.name if previous else 'no checkpoint'}: free space or fix "
                "checkpoint.checkpoint_dir, then rerun the same command to resume"
            ) from None
        if val_loss is not None:
            self._update_lowest_val(final, val_loss)
        if best:
            _write_atomic(self.dir / "BEST", final.name + "\n")
        self._prune()
        return final

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
