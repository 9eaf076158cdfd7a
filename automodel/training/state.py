"""The training state saved beside the weights: everything needed to continue a run exactly."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from automodel.errors import UsageError

TRAIN_STATE_FILE = "train_state.pt"


def save_train_state(state: dict[str, Any], directory: str | Path) -> Path:
    """Writes ``state`` (tensors, numbers, strings, lists, tuples, dicts) with ``torch.save``.

    Returns:
        The file written, flushed to disk.
    """
    path = Path(directory) / TRAIN_STATE_FILE
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def load_train_state(directory: str | Path) -> dict[str, Any]:
    """Reads a training state with ``weights_only=True``: no foreign object is unpickled.

    Raises:
        UsageError: the file is missing or holds something other than plain data.
    """
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.is_file():
        raise UsageError(f"{path} is missing: {Path(directory).name} is not a complete checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise UsageError(f"cannot read the training state {path}: {e}".splitlines()[0]) from None


def collect_state(stateful: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``{name: obj.state_dict()}`` for each stateful object, plus plain ``values``."""
    return {**{name: obj.state_dict() for name, obj in stateful.items()}, **values}


def restore_state(stateful: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Loads each object's part of ``state``; returns the plain values that remain.

    Raises:
        UsageError: the state lacks an object's part (a checkpoint from another version).
    """
    missing = [name for name in stateful if name not in state]
    if missing:
        raise UsageError(f"the training state has no {', '.join(missing)}: it cannot be resumed")
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    return {k: v for k, v in state.items() if k not in stateful}
