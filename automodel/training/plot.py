"""``loss.png``: training and validation loss against step, drawn with matplotlib (Agg)."""

from __future__ import annotations

import math
from pathlib import Path

from automodel.training.metrics import TRAINING_LOG, VALIDATION_LOG, read_jsonl

TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"


def plot_losses(out_dir: str | Path, filename: str = "loss.png") -> Path | None:
    """Draws ``training.jsonl``'s and ``validation.jsonl``'s losses from ``out_dir``.

    Returns:
        The picture's path, or None when there is no finite loss to draw.
    """
    out_dir = Path(out_dir)
    train = [(r["step"], r["loss"]) for r in read_jsonl(out_dir / TRAINING_LOG) if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in read_jsonl(out_dir / VALIDATION_LOG)]
    train = [(s, v) for s, v in train if math.isfinite(v)]
    val = [(s, v) for s, v in val if math.isfinite(v)]
    if not train and not val:
        return None
    from matplotlib.figure import Figure  # imported here: matplotlib is slow to import

    figure = Figure(figsize=(9, 5.2), dpi=100)  # no pyplot: no global state, Agg canvas
    axes = figure.subplots()
    for name, color, points in (("training", TRAIN_COLOR, train), ("validation", VAL_COLOR, val)):
        if points:
            steps, values = zip(*points)
            marker = "o" if name == "validation" or len(points) == 1 else None
            axes.plot(steps, values, color=color, label=name, linewidth=2, marker=marker)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, color="#e1e1e1")
    axes.legend()
    figure.tight_layout()
    path = out_dir / filename
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp, format="png")
    tmp.replace(path)
    return path
