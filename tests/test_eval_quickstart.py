"""The quickstart's quality bar: its default run reads the held-out receipts at field F1 >= 0.9.

Slow (minutes): run with ``python -m pytest -q -m slow tests/test_eval_quickstart.py``.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import ROOT, run_cli

QUICKSTART = ROOT / "examples/vlm/quickstart.yaml"
FIELD_F1_BAR = 0.9


@pytest.mark.slow
def test_quickstart_reads_held_out_receipts(tmp_path):
    env = {"AUTOMODEL_CACHE": str(tmp_path / "cache")}
    ckpt = tmp_path / "checkpoints"
    start = time.perf_counter()
    train = run_cli(
        "finetune",
        "vlm",
        "-c",
        QUICKSTART,
        f"--checkpoint.checkpoint_dir={ckpt}",
        cwd=tmp_path,
        env=env,
        timeout=3600,
    )
    minutes = (time.perf_counter() - start) / 60
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    print(f"quickstart: {minutes:.1f} min including building the model and the data")

    # Every validation receipt (the config evaluates 64 during training).
    result = run_cli(
        "evaluate",
        "-c",
        QUICKSTART,
        "--model",
        ckpt / "final_model",
        "~validation_dataset.limit",
        cwd=tmp_path,
        env=env,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    metrics = json.loads((ckpt / "eval_validation" / "metrics.json").read_text())
    assert metrics["num_samples"] == 200
    assert metrics["scores"]["field_f1"] >= FIELD_F1_BAR, metrics["scores"]
