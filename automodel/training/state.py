"""The training state saved beside the weights: everything needed to continue a run exactly."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from automodel.errors import UsageError

TRAIN_STATE_FILE = "train_state.pt"


def train_state_file(rank: int = 0) -> str:
    """Rank 0's file holds the whole state; another rank's holds only its own part."""
    return TRAIN_STATE_FILE if rank == 0 else f"train_state.rank{rank}.pt"


def save_train_state(state: dict[str, Any], directory: str | Path, rank: int = 0) -> Path:
    """Writes ``state`` (tensors, numbers, strings, lists, tuples, dicts) with ``torch.save``.

    Returns:
        The file written, flushed to disk.
    """
    path = Path(directory) / train_state_file(rank)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def load_train_state(directory: str | Path, rank: int = 0) -> dict[str, Any]:
    """Reads a training state with ``weights_only=True``: no foreign object is unpickled.

    For ``rank`` > 0 the rank's own part (data position, random generators) replaces rank 0's.

    Raises:
        UsageError: the file is missing or holds something other than plain data.
    """
    state = _load(Path(directory) / TRAIN_STATE_FILE)
    if rank > 0:
        state.update(_load(Path(directory) / train_state_file(rank)))
    return state


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{path} is missing: {path.parent.name} is not a complete checkpoint")
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
