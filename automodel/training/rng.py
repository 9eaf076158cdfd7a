"""Seeding every random number generator the run uses, with state that can be saved."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


class StatefulRNG:
    """Seeds Python, NumPy and torch (CPU and CUDA) once, at construction.

    Args:
        seed: the base seed.
        ranked: add the data-parallel rank to the seed, so ranks draw different dropout masks.
    """

    def __init__(self, seed: int = 42, ranked: bool = True):
        rank = int(os.environ.get("RANK", "0")) if ranked else 0
        self.seed = seed + rank
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def state_dict(self) -> dict:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
