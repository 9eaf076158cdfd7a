"""Exact resume after many SIGKILLs (scripts/kill_soak.py): a run killed at random moments, some
in the middle of a checkpoint write, and rerun with the same command after each kill, ends with
the reference's weights bit for bit, its logs value for value and its checkpoint folder."""

from __future__ import annotations

import pytest

from scripts.kill_soak import run_soak

pytestmark = pytest.mark.slow


# 1 rank: 60 steps, 10 kills (the 2nd, 5th and 8th in a checkpoint write). 2 ranks: 30 steps,
# 2 kills (the 2nd in a write); each of its runs pays a torchrun start.
@pytest.mark.parametrize(
    ("nproc", "steps", "kills"), [(1, 60, 10), (2, 30, 2)], ids=["1rank", "2ranks"]
)
def test_a_run_killed_many_times_ends_bitwise_equal(
    nproc, steps, kills, tmp_path, tiny_gemma3, receipts
):
    soak = run_soak(
        tmp_path, steps, kills, nproc, seed=0, model=tiny_gemma3, data=receipts, report=print
    )
    moments = "\n".join(kill.describe() for kill in soak.kills)
    assert len(soak.kills) == kills, moments
    assert soak.mid_write >= 1, moments
    assert soak.problems == [], moments
    assert soak.folder_problems == [], moments
