"""``report.html``: its content, and that headless Chromium renders it with every image."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from automodel.errors import UsageError
from automodel.eval.report import line_chart, write_report


def chromium() -> str:
    """The Chromium binary; the report tests need it (Debian: apt-get install chromium)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("headless Chromium is not installed: apt-get install -y chromium")


def render(page: Path, tmp_path: Path) -> tuple[str, bytes]:
    """Loads ``page`` in headless Chromium; returns the DOM after load and a PNG screenshot."""
    base = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000",
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,2400", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return dom, shot.read_bytes()


def assert_renders(page: Path, tmp_path: Path, images: int) -> str:
    """Chromium loads the page, decodes all ``images`` and paints something."""
    dom, png = render(page, tmp_path)
    assert f'data-images="{images}"' in dom, dom[-2000:]
    assert 'data-broken-images="0"' in dom, dom[-2000:]
    shot = Image.open(__import__("io").BytesIO(png)).convert("L")
    low, high = shot.getextrema()
    assert high - low > 100, "the screenshot is blank"
    return dom


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    run = tmp_path / "checkpoints"
    (run / "eval" / "images").mkdir(parents=True)
    _jsonl(run / "training.jsonl", [{"step": s, "loss": 8 / s} for s in range(1, 21)])
    _jsonl(run / "validation.jsonl", [{"step": s, "val_loss": 9 / (s + 1)} for s in (0, 10, 20)])
    _jsonl(
        run / "eval.jsonl", [{"step": s, "field_f1": s / 25, "json_valid": 1.0} for s in (10, 20)]
    )
    (run / "eval_best.json").write_text('{"metric": "field_f1", "value": 0.8, "step": 20}')
    (run / "config.yaml").write_text("optimizer:\n  lr: 0.001  # <b>not bold</b>\n")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(run / "eval" / "images" / "00000.png")
    _jsonl(
        run / "eval" / "predictions.jsonl",
        [
            {
                "index": 0,
                "prompt": "Read this receipt.",
                "reference": '{"menu": [{"nm": "Tea"}]}',
                "prediction": '{"menu": [{"nm": "<script>alert(1)</script>"}]}',
                "scores": {"field_f1": 0.0},
                "image": "images/00000.png",
            },
            {"index": 1, "prompt": "p", "reference": "r", "prediction": "q", "scores": {}},
        ],
    )
    (run / "eval" / "metrics.json").write_text(
        json.dumps({"scores": {"field_f1": 0.8}, "num_samples": 2, "step": 20})
    )
    return run


def test_report_holds_curves_scores_config_and_gallery(run_dir):
    page = write_report(run_dir)
    assert page == run_dir / "report.html"
    text = page.read_text()
    charts = re.findall(r"<svg.*?</svg>", text, flags=re.DOTALL)
    assert len(charts) == 3  # loss, field_f1, json_valid
    assert "train loss" in charts[0] and "validation loss" in charts[0]
    assert "field_f1" in charts[1] and "json_valid" in charts[2]
    assert "best field_f1: 0.8000 at step 20" in text
    assert "data:image/png;base64," in text
    # Everything from files is escaped: no markup from a prediction or the config gets through.
    assert "<script>alert(1)</script>" not in text
    assert html.escape("<script>alert(1)</script>") in text
    assert html.escape("# <b>not bold</b>") in text
    # Self-contained: no external resource.
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    dom = assert_renders(write_report(run_dir), tmp_path, images=1)
    assert "Validation samples" in dom and "Read this receipt." in dom


def test_report_of_a_run_without_evaluation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _jsonl(run / "training.jsonl", [{"step": 1, "loss": 2.0}])
    text = write_report(run).read_text()
    assert "No predictions yet" in text and "No evaluation scores yet" in text
    with pytest.raises(UsageError, match="not a training run folder"):
        write_report(tmp_path / "nothing")


def test_chart_handles_a_single_point_and_empty_series():
    one = line_chart({"loss": [(5.0, 1.0)], "empty": []}, "t")
    assert one.startswith("<svg") and one.rstrip().endswith("</svg>")
    assert "loss" in one and "empty" not in one
    assert "no data" in line_chart({"a": [(1.0, float("nan"))]}, "t")
