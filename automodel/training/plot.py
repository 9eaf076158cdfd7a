"""``loss.png``: training and validation loss against step, drawn with Pillow.

Pillow is already a dependency (images, receipts); matplotlib would add ~40 MB and a font cache
for one picture.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from automodel.training.metrics import TRAINING_LOG, VALIDATION_LOG, read_jsonl

WIDTH, HEIGHT = 900, 520
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 50, 60
TRAIN_COLOR = (31, 119, 180)
VAL_COLOR = (255, 127, 14)
GRID = (225, 225, 225)
INK = (40, 40, 40)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 5 times a power of ten apart)."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(count + 3) if first + i * step <= high + step * 0.999]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


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
    points = train + val
    if not points:
        return None
    x_ticks = _ticks(0, max(s for s, _ in points))
    y_ticks = _ticks(min(v for _, v in points), max(v for _, v in points))
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def xy(step: float, value: float) -> tuple[float, float]:
        x = LEFT + (step - x_lo) / (x_hi - x_lo) * (WIDTH - LEFT - RIGHT)
        y = HEIGHT - BOTTOM - (value - y_lo) / (y_hi - y_lo) * (HEIGHT - TOP - BOTTOM)
        return x, y

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for t in y_ticks:
        _, y = xy(x_lo, t)
        draw.line([(LEFT, y), (WIDTH - RIGHT, y)], fill=GRID)
        draw.text((LEFT - 8, y), _label(t), fill=INK, font=font, anchor="rm")
    for t in x_ticks:
        x, _ = xy(t, y_lo)
        draw.line([(x, TOP), (x, HEIGHT - BOTTOM)], fill=GRID)
        draw.text((x, HEIGHT - BOTTOM + 8), _label(t), fill=INK, font=font, anchor="mt")
    draw.rectangle([(LEFT, TOP), (WIDTH - RIGHT, HEIGHT - BOTTOM)], outline=INK)
    draw.text((WIDTH / 2, HEIGHT - 18), "step", fill=INK, font=font, anchor="mm")
    draw.text((LEFT, TOP - 28), "loss", fill=INK, font=font, anchor="lm")

    if len(train) > 1:
        draw.line([xy(s, v) for s, v in train], fill=TRAIN_COLOR, width=2)
    for s, v in train if len(train) == 1 else []:
        x, y = xy(s, v)
        draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=TRAIN_COLOR)
    if len(val) > 1:
        draw.line([xy(s, v) for s, v in val], fill=VAL_COLOR, width=2)
    for s, v in val:
        x, y = xy(s, v)
        draw.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=VAL_COLOR)

    legend = [("training", TRAIN_COLOR, train), ("validation", VAL_COLOR, val)]
    x = WIDTH - RIGHT - 220
    for name, color, series in legend:
        if series:
            draw.line([(x, TOP - 28), (x + 24, TOP - 28)], fill=color, width=3)
            draw.text((x + 30, TOP - 28), name, fill=INK, font=font, anchor="lm")
            x += 110
    path = out_dir / filename
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp)
    tmp.replace(path)
    return path
