"""Shared fixtures: a tiny Gemma 3 twin and synthetic receipts, built once per test session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs/reliability.md"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def catalogue_rows() -> list[list[str]]:
    """The table rows of docs/reliability.md (header and separator rows left out), as cells."""
    rows = []
    for line in CATALOGUE.read_text().splitlines():
        if line.startswith("| ") and not line.startswith(("| Case |", "|---")):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def catalogue_node_ids() -> set[str]:
    """The test node ids the catalogue's rows name (their last cell, in backquotes)."""
    return {m.group(1) for row in catalogue_rows() if (m := re.fullmatch(r"`(.+)`", row[-1]))}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks the tests docs/reliability.md names ``catalogue``: ``pytest -m catalogue``."""
    named = catalogue_node_ids()
    for item in items:
        if item.nodeid in named:
            item.add_marker(pytest.mark.catalogue)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    from automodel.twins import make_tiny

    return make_tiny("gemma3", tmp_path_factory.mktemp("models") / "tiny-gemma3", seed=0)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """``tiny_family(name)``: the folder of that family's tiny twin, built once per session."""
    from automodel.twins import make_tiny

    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny(family, root / family, seed=0)
        return built[family]

    return get


@pytest.fixture(scope="session")
def receipts(tmp_path_factory) -> Path:
    from automodel.demo.receipts import make_receipts

    return make_receipts(tmp_path_factory.mktemp("data") / "receipts", n=16, val_n=8, test_n=8)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Runs ``python -m automodel ARGS`` in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "automodel", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_cli(
    *args: str, log: Path, env: dict | None = None, new_group: bool = False
) -> subprocess.Popen:
    """Starts ``python -m automodel ARGS`` without waiting (to signal or kill it mid-run).

    Its stdout and stderr go to the file ``log`` (a pipe nobody reads could fill and block it).
    With ``new_group`` it leads a process group of its own, which ``os.killpg(proc.pid, sig)``
    signals whole (its loader workers and ranks too), as a scheduler or Ctrl-C does.
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "automodel", *map(str, args)],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_group,
        )


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs a Python snippet in a fresh process (nothing shared with the test's memory)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only spin (and on a busy CPU, a lot).

    Use it in a module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def labelled_spans(labels, tokenizer) -> list[str]:
    """Decodes each run of consecutive labelled positions (labels other than -100)."""
    spans, current = [], []
    for token in labels.tolist() + [-100]:
        if token == -100:
            if current:
                spans.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return spans
