"""Give a tiny twin a vision tower that already reads, as a pretrained checkpoint's tower does.

A real VLM arrives with a vision tower that has seen billions of images; a randomly initialised
twin does not, and fine-tuning it end to end on a few thousand pages mostly teaches the decoder
to guess. ``teach_tower_to_read`` stands in for that pretraining on the CPU: it trains the twin's
vision tower and projector, through two throwaway heads over the soft image tokens, to read
receipts. One head spells every field of a receipt's ``gt_parse`` (each menu line's name, count
and price, and the total) character by character from all soft tokens; the other spells, from
each soft token alone, the characters printed in its cell of the page (CORD's word boxes). The
second keeps the reading where the text is, which is what lets the decoder find and copy it.
Only the train split is trained on. The heads are dropped afterwards and the twin, now with a
reading tower, is written as an ordinary Hugging Face folder."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from automodel import artifacts
from automodel.config.sections import LrSchedulerConfig
from automodel.datasets.vlm.base import load_image
from automodel.datasets.vlm.sources import load_folder_split
from automodel.errors import UsageError
from automodel.training.optim import build_optimizer
from automodel.training.schedule import build_lr_scheduler
from automodel.twins.common import save_twin

_PAD = "\0"
_TOKEN_FEATURES = 32
_CELL_CHARS = 4


def receipt_fields(gt_parse: dict[str, Any], max_lines: int) -> list[str]:
    """The strings a reader must spell out: name, count and price of each menu line, the total.

    Missing lines give empty strings, so every receipt has ``3 * max_lines + 1`` fields.

    Args:
        gt_parse: a CORD-style ``gt_parse`` (``menu`` a list or a single dict, ``total``).
        max_lines: menu lines to keep.

    Returns:
        The field strings, in page order.
    """
    menu = gt_parse.get("menu") or []
    menu = [menu] if isinstance(menu, dict) else list(menu)
    fields: list[str] = []
    for i in range(max_lines):
        line = menu[i] if i < len(menu) else {}
        fields += [str(line.get(key, "")) for key in ("nm", "cnt", "price")]
    fields.append(str((gt_parse.get("total") or {}).get("total_price", "")))
    return fields


def cell_characters(ground_truth: dict[str, Any], grid: int, per_cell: int) -> list[str]:
    """The characters printed in each cell of a ``grid`` x ``grid`` split of the page.

    Each word's box (CORD's ``valid_line`` quads) is divided evenly among its characters; a
    character belongs to the cell holding its centre. Cells are in row-major order, as the soft
    image tokens are, and each cell's characters run left to right (at most ``per_cell``).

    Args:
        ground_truth: a CORD-style ground truth with ``valid_line`` and ``meta.image_size``.
        grid: cells per side (the side of the soft-token grid).
        per_cell: characters kept per cell.

    Returns:
        ``grid * grid`` strings.
    """
    size = ground_truth["meta"]["image_size"]
    width, height = size["width"], size["height"]
    cells: list[list[tuple[float, str]]] = [[] for _ in range(grid * grid)]
    for line in ground_truth.get("valid_line", []):
        for word in line["words"]:
            quad, text = word["quad"], word["text"]
            if not text:
                continue
            left, right = min(quad["x1"], quad["x4"]), max(quad["x2"], quad["x3"])
            middle = (min(quad["y1"], quad["y2"]) + max(quad["y3"], quad["y4"])) / 2
            row = min(grid - 1, max(0, int(middle * grid / height)))
            for i, char in enumerate(text):
                x = left + (i + 0.5) * (right - left) / len(text)
                col = min(grid - 1, max(0, int(x * grid / width)))
                cells[row * grid + col].append((x, char))
    return ["".join(char for _, char in sorted(cell))[:per_cell] for cell in cells]


class _Targets:
    """Fixed-width character targets for a list of receipts' fields."""

    def __init__(self, rows: list[list[str]], extra_chars: set[str] = frozenset()) -> None:
        self.widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
        chars = sorted({c for row in rows for field in row for c in field} | set(extra_chars))
        self.charset = [_PAD, *chars]
        self.index = {c: i for i, c in enumerate(self.charset)}
        self.positions = sum(self.widths)
        # Numbers are printed right-aligned, so their characters are aligned from the right:
        # the units digit keeps one target position whatever the number's length.
        self.right_aligned = [
            all(not field or field[-1].isdigit() for field in column) for column in zip(*rows)
        ]

    def encode_cells(self, cells: list[str], per_cell: int) -> list[int]:
        return [self.index[c] for cell in cells for c in cell + _PAD * (per_cell - len(cell))]

    def encode(self, row: list[str]) -> list[int]:
        out: list[int] = []
        for field, width, right in zip(row, self.widths, self.right_aligned, strict=True):
            fill = _PAD * (width - len(field[:width]))
            padded = fill + field[:width] if right else field[:width] + fill
            out += [self.index.get(c, 0) for c in padded]
        return out


def _read_split(data_dir: Path, split: str) -> tuple[list[dict[str, Any]], list[dict]]:
    """One split's parsed ground truths and its undecoded images."""
    rows = load_folder_split(str(data_dir), split, "teach_tower_to_read")[0]
    rows = rows.cast_column("image", datasets.Image(decode=False))
    return [json.loads(gt) for gt in rows["ground_truth"]], rows["image"]


def _pixels(processor, images: list[dict], chunk: int = 256) -> torch.Tensor:
    """Every page through the processor once, kept in float16 (half the memory of thousands of
    float32 pages; the rounding is far below a pixel step)."""
    parts = []
    for start in range(0, len(images), chunk):
        pages = [load_image(image) for image in images[start : start + chunk]]
        pixels = processor.image_processor(images=pages, return_tensors="pt")["pixel_values"]
        parts.append(pixels.to(torch.float16))
    return torch.cat(parts)


class _ReadingTask:
    """The two throwaway heads over the tower's soft tokens and their labels: each field
    spelled from all soft tokens, and the characters printed under each soft token."""

    def __init__(self, model, truths: list[dict], max_lines: int):
        self.model, self.base = model, model.model
        self.tokens = model.config.mm_tokens_per_image
        hidden = model.config.text_config.hidden_size
        grid = math.isqrt(self.tokens)
        fields = [receipt_fields(truth["gt_parse"], max_lines) for truth in truths]
        cells = [cell_characters(truth, grid, _CELL_CHARS) for truth in truths]
        self.targets = _Targets(fields, {c for row in cells for cell in row for c in cell})
        self.labels = torch.tensor([self.targets.encode(row) for row in fields])
        self.cell_labels = torch.tensor(
            [self.targets.encode_cells(row, _CELL_CHARS) for row in cells]
        )
        # Each soft token also spells what is printed under it: a reading that stays where the
        # text is, which the decoder's attention can find and copy.
        self.cell_head = torch.nn.Linear(hidden, _CELL_CHARS * len(self.targets.charset))
        # Each soft token is squeezed to a few features first, which keeps the head (and its
        # optimizer state) small next to the tower however many fields and characters there are.
        self.head = torch.nn.Sequential(
            torch.nn.Linear(hidden, _TOKEN_FEATURES),
            torch.nn.Flatten(1),
            torch.nn.Linear(
                self.tokens * _TOKEN_FEATURES, self.targets.positions * len(self.targets.charset)
            ),
        )

    def learners(self) -> torch.nn.ModuleDict:
        """The tower, projector and heads: the only parameters that train."""
        base = self.base
        trained = [*base.vision_tower.parameters(), *base.multi_modal_projector.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        return torch.nn.ModuleDict(
            {
                "vision_tower": base.vision_tower,
                "multi_modal_projector": base.multi_modal_projector,
                "head": self.head,
                "cell_head": self.cell_head,
            }
        )

    def loss(self, pixels: torch.Tensor, batch: torch.Tensor):
        """Both heads' cross-entropy on one batch of receipts; also the field head's logits."""
        features = self.base.get_image_features(pixels[batch].float()).pooler_output
        logits = self.head(features).view(len(batch), self.targets.positions, -1)
        loss = F.cross_entropy(logits.flatten(0, 1), self.labels[batch].flatten())
        cell_logits = self.cell_head(features).view(len(batch), self.tokens * _CELL_CHARS, -1)
        return loss + F.cross_entropy(
            cell_logits.flatten(0, 1), self.cell_labels[batch].flatten()
        ), logits

    def train(self, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int):
        """``steps`` AdamW steps with the fine-tune's own optimizer and schedule builders,
        printing the loss every fifth of the run."""
        optimizer = build_optimizer(
            {"_target_": "torch.optim.AdamW", "lr": lr, "weight_decay": 0.0},
            self.learners(),
            where="teach_tower_to_read.optimizer",
        )
        warmup = LrSchedulerConfig(lr_warmup_steps=max(1, steps // 20))
        schedule = build_lr_scheduler(optimizer, steps, warmup)
        generator = torch.Generator().manual_seed(seed)
        self.model.train()
        n = len(self.labels)
        order = torch.randperm(n, generator=generator)
        cursor, start = 0, time.perf_counter()
        for step in range(1, steps + 1):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(n, generator=generator), 0
            batch = order[cursor : cursor + batch_size]
            cursor += batch_size
            loss, logits = self.loss(pixels, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % max(1, steps // 5) == 0 or step == steps:
                accuracy = (logits.argmax(-1) == self.labels[batch]).float().mean().item()
                print(
                    f"teach_tower_to_read: step {step}/{steps} loss {loss.item():.4f} "
                    f"character accuracy {accuracy:.3f} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )


def _load(model_dir: Path, data_dir: Path) -> tuple[list, list, Any, Any]:
    """The train receipts (truths, images), and the twin's processor and fp32 model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    truths, images = _read_split(data_dir, "train")
    if not truths:
        raise UsageError(f"teach_tower_to_read: {data_dir} has no train receipts.")
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=False
    )
    if not hasattr(model.model, "get_image_features") or not hasattr(
        model.model, "multi_modal_projector"
    ):
        raise UsageError(
            f"teach_tower_to_read: {model_dir} is not a Gemma-3-style model (no "
            "get_image_features / multi_modal_projector)."
        )
    return truths, images, processor, model


def teach_tower_to_read(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 2e-3,
    max_lines: int = 3,
    seed: int = 0,
    reuse: bool = False,
) -> Path:
    """Train a tiny Gemma 3 twin's vision tower and projector to read receipts; save the twin.

    Prints the loss every fifth of the run and, at the end, how often the field head spells each
    kind of field exactly on the validation receipts (when the data has that split).

    Args:
        model_dir: the twin (``make_tiny("gemma3", ...)``); left untouched.
        data_dir: receipts in CORD-v2's layout (``make_receipts``); only ``train`` is trained
            on (``validation``, when present, is only scored).
        out_dir: where the twin with the trained tower is written.
        steps: optimizer steps (AdamW from ``build_optimizer``; ``build_lr_scheduler``'s linear
            warmup over the first 5%, then cosine decay to zero).
        batch_size: receipts per step.
        lr: peak learning rate.
        max_lines: menu lines read per receipt (extra lines are ignored).
        seed: seed for the head's initialisation and the batch order.
        reuse: return ``out_dir`` untouched when it was built from the same model and data
            folders (as recorded by their builders) with the same arguments.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        UsageError: the model has no Gemma-3-style image features, or the data has no train rows.
    """
    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out_dir)
    params = {
        "model": artifacts.built_record(model_dir),
        "data": artifacts.built_record(data_dir),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "max_lines": max_lines,
        "seed": seed,
        "code": artifacts.code_version(__name__),
    }
    if out.resolve() == model_dir.resolve():
        raise UsageError(f"teach_tower_to_read: out_dir must differ from model_dir ({model_dir}).")
    can_reuse = params["model"] is not None and params["data"] is not None
    if reuse and can_reuse and artifacts.is_built(out, "reading-tower", params):
        return out
    if steps < 1 or batch_size < 1 or max_lines < 1:
        raise UsageError(
            f"teach_tower_to_read: steps={steps}, batch_size={batch_size} and "
            f"max_lines={max_lines} must each be at least 1."
        )
    truths, images, processor, model = _load(model_dir, data_dir)
    base = model.model
    pixels = _pixels(processor, images)
    torch.manual_seed(seed)  # the heads' initialisation
    task = _ReadingTask(model, truths, max_lines)
    task.train(pixels, steps, batch_size, lr, seed)
    model.eval()
    _report_held_out(data_dir, processor, base, task.head, task.targets, max_lines)
    for p in model.parameters():
        p.requires_grad_(True)
    out.mkdir(parents=True, exist_ok=True)
    save_twin(model, processor, out, model.generation_config)
    artifacts.mark_built(out, "reading-tower", params)
    return out


@torch.no_grad()
def _report_held_out(data_dir, processor, base, head, targets: _Targets, max_lines: int) -> None:
    """Print how often the head spells each kind of field exactly on the validation receipts."""
    try:
        truths, images = _read_split(data_dir, "validation")
    except UsageError:
        return
    fields = [receipt_fields(truth["gt_parse"], max_lines) for truth in truths]
    pixels = _pixels(processor, images)
    predicted = []
    for start in range(0, len(truths), 64):
        features = base.get_image_features(pixels[start : start + 64].float()).pooler_output
        predicted.append(head(features).view(len(features), targets.positions, -1).argmax(-1))
    codes = torch.cat(predicted)
    kinds = ["name", "count", "price"] * max_lines + ["total"]
    right: dict[str, list[bool]] = {kind: [] for kind in kinds}
    for row, code in zip(fields, codes.tolist(), strict=True):
        offset = 0
        for j, (field, width) in enumerate(zip(row, targets.widths, strict=True)):
            spelled = "".join(targets.charset[c] for c in code[offset : offset + width])
            offset += width
            if field:
                right[kinds[j]].append(spelled.strip(_PAD) == field)
    summary = ", ".join(f"{k} {sum(v) / max(1, len(v)):.3f}" for k, v in right.items())
    print(f"teach_tower_to_read: exact fields on {len(truths)} validation receipts: {summary}")
