"""Seeding every random number generator the run uses, with state that can be saved."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


class StatefulRNG:
    """Seeds Python, NumPy and torch (CPU and CUDA) once, at construction.

    ``state_dict()`` holds only tensors, ints, floats, strings and tuples, so a checkpoint of it
    loads with ``torch.load(..., weights_only=True)``.

    Args:
        seed: the base seed.
        ranked: add the data-parallel rank to the seed, so ranks draw different dropout masks.
    """

    def __init__(self, seed: int = 42, ranked: bool = True):
        rank = int(os.environ.get("RANK", "0")) if ranked else 0
        self.base_seed = seed  # the same on every rank (data order)
        self.seed = seed + rank
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state(legacy=False)
        state = {
            "python": random.getstate(),
            # NumPy's key is a uint32 array; as an int64 tensor it passes weights_only loading.
            "numpy": {
                "bit_generator": numpy_state["bit_generator"],
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                "pos": int(numpy_state["state"]["pos"]),
                "has_gauss": int(numpy_state["has_gauss"]),
                "gauss": float(numpy_state["gauss"]),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        numpy_state = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": numpy_state["bit_generator"],
                "state": {
                    "key": numpy_state["key"].numpy().astype(np.uint32),
                    "pos": numpy_state["pos"],
                },
                "has_gauss": numpy_state["has_gauss"],
                "gauss": numpy_state["gauss"],
            }
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
