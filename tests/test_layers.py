"""The layer contract in pyproject.toml holds (cli above recipes above components, no cycles),
and it would catch an import that points up."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--config", str(root / "pyproject.toml")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_layer_contract_is_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_it(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(
        ROOT / "automodel", copy / "automodel", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    loss = copy / "automodel" / "loss" / "masked_ce.py"
    loss.write_text(loss.read_text() + "\nimport automodel.recipes.vlm.finetune  # noqa: E402\n")
    result = _lint_imports(copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "automodel.loss.masked_ce" in result.stdout
