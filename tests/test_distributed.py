"""Data parallelism on this CPU: 2 processes with gloo make the same updates as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "scripts" / "parallel_steps.py"


def _run(args, nproc, tmp_path, name):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run(
        [*launcher, str(SCRIPT), *map(str, args), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tiny_gemma3, receipts, tmp_path_factory):
    return _run([tiny_gemma3, receipts, "none"], 1, tmp_path_factory.mktemp("single"), "single")


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_match_one(strategy, single, tiny_gemma3, receipts, tmp_path):
    parallel = _run([tiny_gemma3, receipts, strategy], 2, tmp_path, strategy)
    assert len(single) == len(parallel) == 3
    assert single[1] != single[0], "the steps must change the model"
    for a, b in zip(single, parallel):
        assert abs(a - b) < 1e-4, (single, parallel)
