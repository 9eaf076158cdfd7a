"""``automodel report RUN_DIR``: one self-contained ``report.html`` for a training run.

It holds the loss curves (``training.jsonl``, ``validation.jsonl``) and the metric curves
(``eval.jsonl``) as inline SVG drawn by matplotlib, the latest scores, the resolved ``config.yaml``, and a gallery of
validation samples (image, prompt, reference, prediction) from the newest evaluation folder in the
run (``eval_validation/`` written by ``automodel evaluate``, else ``eval/`` written during
training). Images are embedded as base64 PNG, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from automodel.errors import UsageError
from automodel.training.metrics import read_jsonl

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
GALLERY_DIRS = ("eval_validation", "eval")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: .3em .7em; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.card { display: grid; grid-template-columns: 200px 1fr; gap: 1em; border: 1px solid #ddd;
        border-radius: 6px; padding: .8em; margin-bottom: 1em; }
.card img { width: 200px; image-rendering: pixelated; border: 1px solid #eee; }
.label { font-weight: 600; font-size: .85em; color: #555; margin-top: .4em; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; white-space: pre-wrap;
      word-break: break-all; margin: .2em 0; }
.muted { color: #777; }
"""

# Counts images that failed to decode, so a headless browser (and the tests) can tell.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken-images", String(broken.length));
});
"""


def line_chart(series: dict[str, list[tuple[float, float]]], title: str) -> str:
    """An inline SVG line chart drawn by matplotlib, one line per series (x: step).

    Args:
        series: name -> ``[(step, value), ...]``; non-finite values and empty series are left out.
        title: the chart's caption.

    Returns:
        The ``<svg>`` element as a string (text kept as text, so the page can be searched).
    """
    import matplotlib  # imported here: matplotlib is slow to import
    from matplotlib.figure import Figure

    series = {
        name: [(x, y) for x, y in points if y is not None and math.isfinite(y)]
        for name, points in series.items()
    }
    series = {name: points for name, points in series.items() if points}
    figure = Figure(figsize=(5.2, 2.8), dpi=100)
    axes = figure.subplots()
    axes.set_title(title, fontsize=11, fontweight="bold")
    if not series:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", color="#777777")
        axes.set_axis_off()
    for i, (name, points) in enumerate(series.items()):
        xs, ys = zip(*points)
        marker = "o" if len(points) <= 40 else None
        axes.plot(xs, ys, color=COLORS[i % len(COLORS)], label=name, marker=marker, markersize=3)
    if series:
        axes.set_xlabel("step", fontsize=9)
        axes.tick_params(labelsize=8)
        axes.grid(True, color="#e5e5e5")
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": title}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [
        (float(r["step"]), float(r[key]))
        for r in records
        if "step" in r and isinstance(r.get(key), (int, float))
    ]


def _score_table(scores: dict[str, float], caption: str) -> str:
    rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="num">{v:.4f}</td></tr>'
        for k, v in scores.items()
        if isinstance(v, (int, float))
    )
    return f"<table><caption>{html.escape(caption)}</caption>{rows}</table>"


def _image_data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _gallery(folder: Path, limit: int) -> str:
    records = read_jsonl(folder / "predictions.jsonl")
    if not records:
        return ""
    cards = []
    for record in records[:limit]:
        image = ""
        if record.get("image"):
            uri = _image_data_uri(folder / record["image"])
            if uri:
                image = f'<img src="{uri}" alt="sample {record.get("index")}">'
        scores = ", ".join(
            f"{html.escape(k)} {v:.3f}"
            for k, v in (record.get("scores") or {}).items()
            if isinstance(v, (int, float))
        )
        cards.append(
            f'<div class="card"><div>{image}<div class="muted">sample '
            f"{html.escape(str(record.get('index')))}</div></div><div>"
            f'<div class="label">prompt</div><pre>{html.escape(str(record.get("prompt", "")))}</pre>'
            f'<div class="label">reference</div>'
            f"<pre>{html.escape(str(record.get('reference', '')))}</pre>"
            f'<div class="label">prediction</div>'
            f"<pre>{html.escape(str(record.get('prediction', '')))}</pre>"
            f'<div class="muted">{scores}</div></div></div>'
        )
    return "".join(cards)


def write_report(
    run_dir: str | Path, out: str | Path | None = None, gallery_size: int = 16
) -> Path:
    """Writes the run's ``report.html``.

    Args:
        run_dir: a ``checkpoint_dir`` of ``automodel finetune``.
        out: the HTML file; default ``RUN_DIR/report.html``.
        gallery_size: most samples shown in the gallery.

    Returns:
        The path written.

    Raises:
        UsageError: ``run_dir`` is not a run folder.
    """
    run = Path(run_dir)
    logs = {name: run / name for name in ("training.jsonl", "validation.jsonl", "eval.jsonl")}
    if not run.is_dir() or not any(p.is_file() for p in [*logs.values(), run / "config.yaml"]):
        raise UsageError(
            f"{run} is not a training run folder (no training.jsonl, validation.jsonl, "
            "eval.jsonl or config.yaml): pass the run's checkpoint_dir"
        )
    train = read_jsonl(logs["training.jsonl"])
    val = read_jsonl(logs["validation.jsonl"])
    evals = read_jsonl(logs["eval.jsonl"])
    tables, gallery_html = _scores_and_gallery(run, evals, gallery_size)
    page = _page(run, _summary(run, train, val), _charts(train, val, evals), tables, gallery_html)
    path = Path(out) if out is not None else run / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def _charts(train: list[dict], val: list[dict], evals: list[dict]) -> list[str]:
    """The loss curves (training and validation), then one chart per evaluation score."""
    charts = [
        line_chart(
            {"train loss": _points(train, "loss"), "validation loss": _points(val, "val_loss")},
            "loss",
        )
    ]
    score_keys = [k for k in (evals[-1] if evals else {}) if k != "step"]
    return charts + [line_chart({key: _points(evals, key)}, key) for key in score_keys]


def _summary(run: Path, train: list[dict], val: list[dict]) -> list[str]:
    """Bullet points: training log lines, the last validation loss, the best tracked score."""
    summary = []
    if train:
        summary.append(f"<li>{len(train)} training log lines, last step {train[-1].get('step')}")
    if val:
        summary.append(
            f"<li>validation loss {val[-1].get('val_loss', math.nan):.4f} at step "
            f"{val[-1].get('step')}</li>"
        )
    best_path = run / "eval_best.json"
    if best_path.is_file():
        best = json.loads(best_path.read_text())
        summary.append(
            f"<li>best {html.escape(str(best.get('metric')))}: "
            f"{best.get('value', math.nan):.4f} at step {best.get('step')}</li>"
        )
    return summary


def _scores_and_gallery(run: Path, evals: list[dict], gallery_size: int) -> tuple[list, str]:
    """Score tables (the latest evaluation during training, each evaluation folder) and the
    gallery of the first folder with predictions."""
    tables = []
    if evals:
        latest = {k: v for k, v in evals[-1].items() if k != "step"}
        tables.append(_score_table(latest, f"evaluation during training, step {evals[-1]['step']}"))
    gallery, gallery_source = "", None
    for name in GALLERY_DIRS:
        folder = run / name
        metrics_file = folder / "metrics.json"
        # eval/ holds the same scores as eval.jsonl's last line, already shown above.
        if metrics_file.is_file() and not (name == "eval" and evals):
            meta = json.loads(metrics_file.read_text())
            where = f"{name}/ ({meta.get('num_samples')} samples"
            where += f", split {meta['split']})" if meta.get("split") else ")"
            tables.append(_score_table(meta.get("scores", {}), where))
        if not gallery:
            gallery = _gallery(folder, gallery_size)
            gallery_source = name if gallery else None
    if not gallery:
        return tables, (
            '<p class="muted">No predictions yet: set step_scheduler.eval_every_steps, or run '
            "automodel evaluate -c CONFIG --model RUN_DIR/final_model.</p>"
        )
    source = html.escape(gallery_source)
    return tables, f'<p class="muted">from {source}/predictions.jsonl</p>{gallery}'


def _page(run: Path, summary: list, charts: list, tables: list, gallery_html: str) -> str:
    """The whole HTML page, self-contained (styles and script inline)."""
    esc = html.escape
    config_path = run / "config.yaml"
    config = config_path.read_text() if config_path.is_file() else "(no config.yaml)"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>automodel report: {esc(run.resolve().name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>Training report: {esc(str(run))}</h1>
<p class="muted">written {when} by automodel report</p>
<ul>{"".join(summary)}</ul>
<h2>Curves</h2>
<div class="charts">{"".join(charts)}</div>
<h2>Scores</h2>
{"".join(tables) or '<p class="muted">No evaluation scores yet.</p>'}
<h2>Validation samples</h2>
{gallery_html}
<h2>Resolved config</h2>
<pre>{esc(config)}</pre>
<script>{_SCRIPT}</script>
</body></html>
"""
