"""Generation-based evaluation: greedy replies to a dataset's prompts, scored by task metrics.

``evaluate`` takes any dataset of conversation samples (the project's sample schema), asks the
model for the last assistant turn of each, and scores the replies against it.
``write_outputs`` saves what an evaluation produced, in one folder:

    metrics.json        {"scores": {...}, "num_samples": N, "metrics": [...], ...}
    predictions.jsonl   one line per sample: index, prompt, reference, prediction, scores, image
    images/00000.png    the first ``gallery_size`` samples' images (for ``automodel report``)
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automodel.datasets.collate import prompt_problem
from automodel.errors import UsageError
from automodel.eval.metrics import compute_metrics, expand_metric_names
from automodel.generation import generate_replies, prompt_messages, reply_text
from automodel.paths import is_local_path

FALLBACK_METRICS = "vqa"


def default_metrics(dataset: Any) -> list[str]:
    """The metrics a dataset is scored with unless ``eval.metrics`` says otherwise.

    The builder's dataset names them (``default_metric``: CORD-v2 -> ``cord``, VQA -> ``vqa``,
    image-text -> ``caption``); anything that names none gets exact match and ANLS.
    """
    # Wrappers (the training run's screened dataset, torch Subset) keep the built one in .dataset.
    while getattr(dataset, "default_metric", None) is None and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return expand_metric_names(getattr(dataset, "default_metric", None) or FALLBACK_METRICS)


@dataclass
class EvalResult:
    """What one evaluation produced.

    Attributes:
        scores: corpus-level metric values.
        records: one dict per sample (``index``, ``prompt``, ``reference``, ``prediction``,
            ``scores``); the first ``keep_images`` records also hold the PIL ``image``.
        metrics: the metric names that were run.
        skipped: ``{"index", "reason"}`` of each sample whose prompt cannot be generated from
            (it spells a special token); they are not scored.
    """

    scores: dict[str, float]
    records: list[dict] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _first_image(messages: list[dict]):
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image":
                    return part.get("image")
    return None


def _prompt_text(messages: list[dict]) -> str:
    users = [m for m in messages if m["role"] == "user"]
    return reply_text(users[-1]) if users else ""


def _prompt_and_record(dataset, index: int, keep_images: int) -> tuple[list[dict], dict]:
    """Sample ``index``'s prompt (every turn before the last) and its record: index, prompt
    text, reference (the last assistant turn), and its image if ``index < keep_images``."""
    conversation = dataset[index]["conversation"]
    if conversation[-1]["role"] != "assistant":
        raise UsageError(
            f"evaluation sample {index} ends with a {conversation[-1]['role']} turn: "
            "each sample needs an assistant answer to score the reply against"
        )
    prompt = prompt_messages(conversation)
    record = {
        "index": index,
        "prompt": _prompt_text(prompt),
        "reference": reply_text(conversation[-1]),
    }
    if index < keep_images:
        record["image"] = _first_image(prompt)
    return prompt, record


def evaluate(
    model,
    processor,
    dataset,
    metrics: str | Sequence[str] | None = None,
    max_samples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    keep_images: int = 0,
    progress: bool = False,
    chat_template_kwargs: dict | None = None,
) -> EvalResult:
    """Generates a reply for each sample's prompt and scores it against the sample's answer.

    The reference is the text of the sample's last assistant turn; the prompt is everything
    before it. Generation is greedy and batched (left padding, KV cache).

    Args:
        model: a transformers VLM (put in eval mode for the call, then restored).
        processor: its processor.
        dataset: map-style dataset of ``{"conversation": [...]}`` samples.
        metrics: metric or group names; ``None`` uses :func:`default_metrics`.
        max_samples: evaluate only the first ``max_samples`` samples.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: the longest reply.
        keep_images: keep the image of the first ``keep_images`` samples in the records.
        progress: show a progress bar.
        chat_template_kwargs: variables for the chat template, as in training.

    Returns:
        The scores and the per-sample records.
    """
    names = default_metrics(dataset) if metrics is None else expand_metric_names(metrics)
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc="evaluating", unit="sample")
    records: list[dict] = []
    predictions: list[str] = []
    skipped: list[dict] = []
    try:
        for start in range(0, count, batch_size):
            # Samples are read one batch at a time so only a batch of images is ever decoded.
            batch = []
            for index in range(start, min(start + batch_size, count)):
                prompt, record = _prompt_and_record(dataset, index, keep_images)
                problem = prompt_problem(prompt, processor)
                if problem:
                    skipped.append({"index": index, "reason": problem})
                    print(f"WARNING: skipped evaluation sample {index}: {problem}", file=sys.stderr)
                    continue
                batch.append(prompt)
                records.append(record)
            if not batch:
                continue
            predictions += generate_replies(
                model,
                processor,
                batch,
                max_new_tokens,
                batch_size=len(batch),
                chat_template_kwargs=chat_template_kwargs,
            )
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    if skipped and not records:
        raise UsageError(
            f"no evaluation sample can be generated from: all {len(skipped)} skipped (first, "
            f"sample {skipped[0]['index']}: {skipped[0]['reason']})"
        )
    result = compute_metrics(names, predictions, [[r["reference"]] for r in records])
    for record, prediction, scores in zip(records, predictions, result.per_sample):
        record["prediction"] = prediction
        record["scores"] = scores
    return EvalResult(result.scores, records, names, skipped)


def write_outputs(result: EvalResult, out_dir: str | Path, **meta: Any) -> Path:
    """Writes ``metrics.json``, ``predictions.jsonl`` and ``images/`` into ``out_dir``.

    Args:
        result: an :func:`evaluate` result.
        out_dir: the folder (created; files of the same names are replaced).
        **meta: extra entries for ``metrics.json`` (model, split, step ...).

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.png"):
        old.unlink()
    lines = []
    for record in result.records:
        row = {k: v for k, v in record.items() if k != "image"}
        image = record.get("image")
        if image is not None and hasattr(image, "save"):
            name = f"images/{record['index']:05d}.png"
            image.save(out / name)
            row["image"] = name
        lines.append(json.dumps(row, ensure_ascii=False))
    _write_text(out / "predictions.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    summary = {
        "scores": result.scores,
        "num_samples": len(result.records),
        "metrics": result.metrics,
        **({"skipped": result.skipped} if result.skipped else {}),
        **meta,
    }
    _write_text(out / "metrics.json", json.dumps(summary, indent=2, default=str) + "\n")
    return out


def default_out_dir(model: str, split: str) -> Path:
    """Where ``automodel evaluate`` writes: beside a local model folder
    (``checkpoints/final_model`` -> ``checkpoints/eval_<split>``); ``./eval_<split>`` for a hub
    id."""
    name = "eval_" + re.sub(r"[^\w.-]+", "_", split).strip("_")
    if is_local_path(model):
        return Path(model).expanduser().resolve().parent / name
    return Path(name)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def markdown_table(scores: dict[str, float], title: str = "metric") -> str:
    """Scores as a two-column Markdown table."""
    rows = [f"| {title} | value |", "|---|---:|"]
    rows += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
    return "\n".join(rows)
