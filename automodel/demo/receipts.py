"""Deterministic synthetic receipts, written to disk in CORD-v2's own layout and schema.

``make_receipts(out_dir)`` writes ``out_dir/data/{train,validation,test}-00000-of-00001.parquet``
with the two columns of the hub dataset ``naver-clova-ix/cord-v2``: ``image`` (PNG bytes embedded
through the datasets ``Image()`` feature) and ``ground_truth`` (a JSON string with ``gt_parse``,
``meta``, ``valid_line``, ``roi``, ``repeating_symbol`` and ``dontcare``). ``datasets.load_dataset``
therefore reads the folder exactly as it reads the hub copy, and so does ``make_cord_v2_dataset``.

The receipts are deliberately easy: a few large black lines on a white near-square page, with
every price following from the item names and counts, so that a tiny randomly initialised VLM can
learn to read them on a CPU in a few hundred steps.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from automodel import artifacts
from automodel.errors import UsageError

# Item name -> unit price (rupiah, as in CORD). Short names with distinct first letters stay
# legible and distinguishable after the processor shrinks the page to 128x128.
CATALOGUE: dict[str, int] = {
    "Latte": 18_000,
    "Mocha": 22_000,
    "Tea": 9_000,
    "Bagel": 15_000,
    "Donut": 12_000,
    "Juice": 16_000,
    "Soup": 20_000,
    "Cake": 25_000,
    "Pizza": 30_000,
    "Water": 5_000,
}

SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Ink and paper: high contrast, with a little paper tint so pages are not all pixel-identical.
# Pages are grayscale ("L"): it is 3x cheaper to PNG-encode than RGB, and readers convert to RGB.
_INK = 0
_PAPER_MIN = 235

# Bounded retries when drawing a held-out receipt that is unseen in the earlier splits.
_MAX_DRAWS = 10_000

_README = """\
---
dataset_info:
  features:
  - name: image
    dtype: image
  - name: ground_truth
    dtype: string
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
  - split: test
    path: data/test-*
---

# Synthetic receipts (CORD-v2 layout)

Generated offline by `automodel.demo.receipts.make_receipts(seed={seed})`; nothing here comes
from the real CORD-v2 receipts. The folder has the same layout and columns as the hub dataset
`naver-clova-ix/cord-v2`, so `datasets.load_dataset("<this folder>", split="validation")` and
`make_cord_v2_dataset("<this folder>")` read it in place of the hub copy.

- `image`: a {canvas}x{canvas} grayscale PNG receipt: 1 to {max_items} menu lines (`<count> <item>` and
  the line price), a rule, and a `TOTAL` line.
- `ground_truth`: JSON with `gt_parse` (`menu` as a list of `nm`/`cnt`/`price`, `total` with
  `total_price`), `meta`, `valid_line` (word boxes and categories), `roi`,
  `repeating_symbol` and `dontcare`, as in CORD-v2.

Rows: train {train}, validation {validation}, test {test}. Validation and test receipts use item
and count combinations that do not occur in train (test also avoids validation).
Catalogue (unit prices): {catalogue}.
"""


@dataclass(frozen=True)
class _Style:
    """Page geometry shared by every receipt of one generation."""

    canvas: int
    font_size: int
    margin: int
    jitter: int

    @property
    def pitch(self) -> int:
        # Line-to-line distance; 1.5 em leaves clear white space between rows after downscaling.
        return round(self.font_size * 1.5)


def format_price(value: int) -> str:
    """Format an integer amount the way CORD writes prices, e.g. ``12000 -> "12,000"``.

    Args:
        value: amount in currency units.

    Returns:
        The amount with comma thousands separators.
    """
    return f"{value:,}"


def _check_knobs(
    n: int, val_n: int, test_n: int, max_items: int, max_qty: int, font_size: int, jitter: int
) -> None:
    """Refuses sizes and difficulty knobs out of range, naming the argument."""
    for name, value in (("n", n), ("val_n", val_n), ("test_n", test_n)):
        if value < 1:
            raise UsageError(f"make_receipts: {name}={value} must be at least 1.")
    if not 1 <= max_items <= len(CATALOGUE):
        raise UsageError(
            f"make_receipts: max_items={max_items} must be between 1 and {len(CATALOGUE)} "
            "(the catalogue size)."
        )
    if max_qty < 1:
        raise UsageError(f"make_receipts: max_qty={max_qty} must be at least 1.")
    if font_size < 4 or jitter < 0:
        raise UsageError(
            f"make_receipts: font_size={font_size} must be at least 4 and jitter={jitter} at "
            "least 0."
        )


def _write_splits(
    data_dir: Path, sizes: dict, seed: int, max_items: int, max_qty: int, style, font
) -> None:
    """Renders each split's receipts into one parquet file; validation and test draw item
    combinations not seen in the splits before them."""
    features = datasets.Features(
        {"image": datasets.Image(), "ground_truth": datasets.Value("string")}
    )
    seen: set[tuple[tuple[str, int], ...]] = set()
    for split in SPLITS:
        # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and hosts.
        rng = random.Random(f"automodel-receipts/{seed}/{split}")
        held_out = split != "train"
        images: list[dict[str, Any]] = []
        truths: list[str] = []
        new_keys: set[tuple[tuple[str, int], ...]] = set()
        for image_id in range(sizes[split]):
            items = _draw_items(rng, max_items, max_qty, avoid=seen if held_out else None)
            new_keys.add(tuple(items))
            png, ground_truth = _render(rng, items, style, font, split, image_id)
            images.append({"bytes": png, "path": None})
            truths.append(json.dumps(ground_truth, ensure_ascii=False))
        seen |= new_keys
        table = pa.table({"image": images, "ground_truth": truths}, schema=features.arrow_schema)
        pq.write_table(table, data_dir / f"{split}-00000-of-00001.parquet", row_group_size=100)


def make_receipts(
    out_dir: str | os.PathLike[str],
    n: int = 1000,
    seed: int = 0,
    val_n: int | None = None,
    test_n: int | None = None,
    *,
    max_items: int = 3,
    max_qty: int = 3,
    canvas: int = 256,
    font_size: int = 30,
    jitter: int = 6,
    reuse: bool = False,
) -> Path:
    """Write a synthetic receipt dataset in CORD-v2's layout (train, validation and test splits).

    The output is deterministic: the same arguments give byte-identical parquet files. Each
    split draws from its own seed derived from ``seed``; validation and test receipts are item and
    count combinations that do not appear in train (and test ones not in validation).

    Args:
        out_dir: folder to write; ``data/`` and ``README.md`` inside it are (over)written.
        n: number of train receipts.
        seed: base random seed.
        val_n: number of validation receipts; defaults to ``max(8, n // 10)``.
        test_n: number of test receipts; defaults to ``max(8, n // 10)``.
        max_items: most menu lines on one receipt (each receipt has 1 to ``max_items`` distinct
            catalogue items).
        max_qty: largest count of one item (counts are 1 to ``max_qty``).
        canvas: side of the square page in pixels.
        font_size: text size in pixels at ``canvas`` resolution.
        jitter: largest random shift of the text block, in pixels, so pages differ in layout.
        reuse: return ``out_dir`` untouched when it already holds receipts made with the same
            arguments.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        UsageError: a size or difficulty knob is out of range, or the page cannot hold the text.
    """
    val_n = max(8, n // 10) if val_n is None else val_n
    test_n = max(8, n // 10) if test_n is None else test_n
    params = {
        "n": n,
        "seed": seed,
        "val_n": val_n,
        "test_n": test_n,
        "max_items": max_items,
        "max_qty": max_qty,
        "canvas": canvas,
        "font_size": font_size,
        "jitter": jitter,
        "code": artifacts.code_version(__name__),
    }
    if reuse and artifacts.is_built(out_dir, "receipts", params):
        return Path(out_dir)
    _check_knobs(n, val_n, test_n, max_items, max_qty, font_size, jitter)
    style = _Style(canvas=canvas, font_size=font_size, margin=max(8, canvas // 24), jitter=jitter)
    font = ImageFont.load_default(size=font_size)
    _check_fits(style, font, max_items, max_qty)

    out = Path(out_dir)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    sizes = {"train": n, "validation": val_n, "test": test_n}
    _write_splits(data_dir, sizes, seed, max_items, max_qty, style, font)
    catalogue = ", ".join(f"{name} {format_price(price)}" for name, price in CATALOGUE.items())
    readme = _README.format(
        seed=seed, canvas=canvas, max_items=max_items, catalogue=catalogue, **sizes
    )
    (out / "README.md").write_text(readme, encoding="utf-8")
    artifacts.mark_built(out, "receipts", params)
    return out


def _draw_items(
    rng: random.Random,
    max_items: int,
    max_qty: int,
    avoid: set[tuple[tuple[str, int], ...]] | None,
) -> list[tuple[str, int]]:
    """Draw (name, count) menu lines; when ``avoid`` is given, redraw until unseen."""
    names = list(CATALOGUE)
    for _ in range(_MAX_DRAWS):
        k = rng.randint(1, max_items)
        items = [(name, rng.randint(1, max_qty)) for name in rng.sample(names, k)]
        if avoid is None or tuple(items) not in avoid:
            return items
    raise UsageError(
        "make_receipts: the train split already covers almost every item combination, so no "
        "unseen validation/test receipt could be drawn; lower n or raise max_items/max_qty."
    )


def _check_fits(style: _Style, font: ImageFont.FreeTypeFont, max_items: int, max_qty: int) -> None:
    """Fail early when the longest possible receipt would not fit on the page."""
    item_line = max(
        font.getlength(f"{max_qty} {name}") + font.getlength(format_price(price * max_qty))
        for name, price in CATALOGUE.items()
    )
    top_prices = sorted(CATALOGUE.values(), reverse=True)[:max_items]
    total_line = font.getlength("TOTAL") + font.getlength(format_price(sum(top_prices) * max_qty))
    widest = max(item_line, total_line)
    usable = style.canvas - 2 * (style.margin + style.jitter)
    height = (max_items + 1) * style.pitch + style.pitch // 2
    if widest + style.font_size // 2 > usable or height > usable:
        raise UsageError(
            f"make_receipts: a {max_items}-item receipt at font_size={style.font_size} does not "
            f"fit a {style.canvas}px page; lower font_size or max_items, or raise canvas."
        )


def _quad(box: tuple[float, float, float, float]) -> dict[str, int]:
    """CORD's word quadrilateral (clockwise from top-left) for an axis-aligned box."""
    x0, y0, x1, y1 = (round(v) for v in box)
    return {"x1": x0, "y1": y0, "x2": x1, "y2": y0, "x3": x1, "y3": y1, "x4": x0, "y4": y1}


class _Sheet:
    """Draws a receipt's lines top to bottom and records each word's box, as CORD stores them."""

    def __init__(self, page: Image.Image, style: _Style, font, dx: int, dy: int):
        self.draw = ImageDraw.Draw(page)
        self.style, self.font = style, font
        self.left = style.margin + style.jitter + dx
        self.right = style.canvas - style.margin - style.jitter + dx
        self.y = style.margin + style.jitter + dy

    def word(self, text: str, x: float, anchor: str, is_key: int, row: int) -> dict[str, Any]:
        # "ls"/"rs" anchor at the baseline so digits and letters share one line regardless of
        # descenders; the stored box is the drawn glyph box.
        at = (x, self.y + self.style.font_size)
        self.draw.text(at, text, fill=_INK, font=self.font, anchor=anchor)
        box = self.draw.textbbox(at, text, font=self.font, anchor=anchor)
        return {"quad": _quad(box), "is_key": is_key, "row_id": row, "text": text}

    def menu(self, items: list[tuple[str, int]]) -> tuple[list[dict], list[dict], int]:
        """One line per item (count, name, price): the parse's menu, its valid lines, the
        total in cents."""
        menu: list[dict[str, str]] = []
        valid_line: list[dict[str, Any]] = []
        total = 0
        for row, (name, count) in enumerate(items):
            price = CATALOGUE[name] * count
            total += price
            cnt_word = self.word(str(count), self.left, "ls", 0, row)
            name_x = self.left + self.font.getlength(f"{count} ")
            name_word = self.word(name, name_x, "ls", 0, row)
            price_word = self.word(format_price(price), self.right, "rs", 0, row)
            for category, w in (
                ("menu.cnt", cnt_word),
                ("menu.nm", name_word),
                ("menu.price", price_word),
            ):
                valid_line.append(
                    {"words": [w], "category": category, "group_id": row, "sub_group_id": 0}
                )
            menu.append({"nm": name, "cnt": str(count), "price": format_price(price)})
            self.y += self.style.pitch
        return menu, valid_line, total

    def total(self, total: int, row: int) -> dict[str, Any]:
        """A rule between the menu and the total, as printed receipts have, then the total."""
        style = self.style
        rule_y = self.y + style.pitch // 4
        width = max(2, style.font_size // 12)
        self.draw.line([(self.left, rule_y), (self.right, rule_y)], fill=_INK, width=width)
        self.y += style.pitch // 2
        key_word = self.word("TOTAL", self.left, "ls", 1, row)
        total_word = self.word(format_price(total), self.right, "rs", 0, row)
        return {
            "words": [key_word, total_word],
            "category": "total.total_price",
            "group_id": row,
            "sub_group_id": 0,
        }


def _render(
    rng: random.Random,
    items: list[tuple[str, int]],
    style: _Style,
    font: ImageFont.FreeTypeFont,
    split: str,
    image_id: int,
) -> tuple[bytes, dict[str, Any]]:
    """Draw one receipt; return its PNG bytes and its CORD-style ground truth."""
    paper = rng.randint(_PAPER_MIN, 255)
    page = Image.new("L", (style.canvas, style.canvas), paper)
    dx = rng.randint(-style.jitter, style.jitter)
    dy = rng.randint(-style.jitter, style.jitter)
    sheet = _Sheet(page, style, font, dx, dy)
    menu, valid_line, total = sheet.menu(items)
    valid_line.append(sheet.total(total, len(items)))
    ground_truth = {
        "gt_parse": {"menu": menu, "total": {"total_price": format_price(total)}},
        "meta": {
            "version": "2.0.0",
            "split": split,
            "image_id": image_id,
            "image_size": {"width": style.canvas, "height": style.canvas},
        },
        "valid_line": valid_line,
        "roi": _quad((0, 0, style.canvas - 1, style.canvas - 1)),
        "repeating_symbol": [],
        "dontcare": [],
    }
    buf = io.BytesIO()
    # Fixed compression settings and no metadata chunks keep the PNG bytes reproducible.
    page.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue(), ground_truth
