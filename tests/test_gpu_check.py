"""``scripts/gpu_check.sh``, the one command a lent GPU runs: its parts at tiny sizes on this CPU.

``--smoke`` runs what the GPU runs (real_shape, vs_trl, FSDP2 on two ranks, here gloo) through the
same script, timeouts and summary; the GPU's own figures come only from a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_and_summarises_them(tmp_path):
    env = {
        **os.environ,
        "PY": sys.executable,
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_WORK": str(tmp_path / "work"),
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), "--smoke"],
        cwd=tmp_path,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    summary = result.stdout[result.stdout.index("gpu_check: summary (smoke") :]
    lines = {m[1]: m[0] for m in re.finditer(r"^gpu_check: (\w+) exit=.*$", summary, re.MULTILINE)}
    assert set(lines) == {"real_shape", "vs_trl", "fsdp2_lora", "fsdp2_full"}, summary
    number = r"[0-9.]+"
    assert re.fullmatch(
        rf"gpu_check: real_shape exit=0 seconds={number} \| model=gemma3 step_s={number} "
        rf"tokens_per_s={number} mfu=n/a cuda_peak_gb=n/a peak_gb={number} .*",
        lines["real_shape"],
    )
    assert re.fullmatch(
        rf"gpu_check: vs_trl exit=0 seconds={number} \| speedup={number} "
        rf"memory_ratio={number}",
        lines["vs_trl"],
    )
    for name, steps in (("fsdp2_lora", "3/3"), ("fsdp2_full", "5/5")):
        assert re.fullmatch(
            rf"gpu_check: {name} exit=0 seconds={number} \| step={steps} loss={number} "
            rf"tokens_per_s={number} peak_gb={number}",
            lines[name],
        )
    # The log keeps the whole output, summary included; each part's output is beside it.
    log = tmp_path / "out" / "gpu_check.log"
    assert lines["vs_trl"] in log.read_text()
    for name in lines:
        assert (tmp_path / "out" / f"gpu_check_{name}.log").is_file()
