"""``automodel data check``'s scan of one dataset: what its data looks like to the model.

The sample count, every bad sample with its ``file:line`` (or row) and reason, and histograms of
text and image-token lengths as the collate renders them (the processor's chat template), with
the share over ``dataloader.collate_fn.max_length``; ``format_report`` writes the report as
text. ``render_sample`` shows one collated row as text with its labelled tokens marked
(``data check --show N``). ``recipes/vlm/data_check.py`` builds a config's datasets and calls
these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from automodel.common import IGNORE_INDEX
from automodel.datasets import collate
from automodel.datasets.checks import BadSample, sample_location, scan_dataset

BAR = 30
# Around each run of labelled tokens in a rendered sample: characters no chat template uses.
LABEL_OPEN, LABEL_CLOSE = "\u27e6", "\u27e7"


def check_dataset(
    dataset: Any,
    name: str,
    processor: Any,
    max_length: int | None,
    max_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Scan one dataset and measure its token lengths through the processor's chat template.

    Returns:
        ``num_samples``, ``num_bad``, ``bad`` (a list of ``{dataset, where, reason, stage}``),
        ``measured``, ``text_tokens`` / ``image_tokens`` / ``total_tokens`` / ``label_tokens``
        summaries, ``over_max_length``, ``scan_seconds`` and ``samples_per_s`` (preprocessing
        throughput of this process, the measured samples over the time to render them).
    """
    start = time.perf_counter()
    good, bad = scan_dataset(dataset, name)
    scan_seconds = time.perf_counter() - start
    measure = _subset(good, max_samples, seed)
    image_ids = torch.tensor(collate.image_token_ids(processor))
    text, images, totals, labels = [], [], [], []
    start = time.perf_counter()
    for i in measure:
        lengths = _measure(dataset, i, processor, image_ids)
        if isinstance(lengths, str):
            bad.append(BadSample(name, sample_location(dataset, i, name), lengths, "decode"))
            continue
        totals.append(lengths[0])
        images.append(lengths[1])
        text.append(lengths[0] - lengths[1])
        labels.append(lengths[2])
    prepare_seconds = time.perf_counter() - start
    over = sum(t > max_length for t in totals) if max_length is not None else 0
    return {
        "num_samples": len(dataset),
        "num_bad": len(bad),
        "bad": [vars(b) for b in bad],
        "measured": len(totals),
        "text_tokens": summarize(text),
        "image_tokens": summarize(images),
        "total_tokens": summarize(totals),
        "label_tokens": summarize(labels),
        "over_max_length": over,
        "over_max_length_share": over / len(totals) if totals else 0.0,
        "scan_seconds": round(scan_seconds, 3),
        # Reading, chat template and image processing of one sample at a time, in this process:
        # what one DataLoader worker delivers, to set against the training loop's samples/s.
        "samples_per_s": round(len(totals) / prepare_seconds, 2) if totals else None,
    }


def _subset(good: list[int], max_samples: int, seed: int) -> list[int]:
    """At most ``max_samples`` of the indices ``good``, a seeded random subset in order."""
    if max_samples and len(good) > max_samples:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(good), size=max_samples, replace=False).tolist())
        return [good[i] for i in chosen]
    return list(good)


def _measure(dataset: Any, i: int, processor: Any, image_ids: torch.Tensor) -> tuple | str:
    """Sample ``i`` rendered as the collate renders it: its (total, image, label) token
    counts, or why it cannot be trained on."""
    # The collate's own per-sample verdict (special tokens in text, images in replies ...).
    collate_problem = getattr(collate, "sample_problem", None)
    try:
        conversation = dataset[i]["conversation"]
        problem = collate_problem(conversation, processor) if collate_problem else None
        batch = None if problem else collate.render_batch([conversation], processor)
    except Exception as exc:  # noqa: BLE001 - one sample's failure is reported, not fatal
        problem = str(exc) if exc.__class__.__name__ == "BadSampleError" else repr(exc)
    if problem:
        return problem
    # A template that renders history differently from generation gives one row per reply:
    # the longest row is the sample's length, every row's labels count.
    lengths = batch["attention_mask"].sum(dim=1)
    row = int(lengths.argmax())
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
    n_image = int(torch.isin(ids, image_ids).sum())
    return len(ids), n_image, int((batch["labels"] != IGNORE_INDEX).sum())


def summarize(values: list[int], bins: int = 10) -> dict[str, Any]:
    """Min / percentiles / max and a histogram (``edges`` and ``counts``) of integer values."""
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    lo, hi = int(array.min()), int(array.max())
    bins = max(1, min(bins, hi - lo + 1))
    counts, edges = np.histogram(array, bins=bins, range=(lo, hi + 1))
    return {
        "count": len(values),
        "min": lo,
        "p50": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
        "max": hi,
        "mean": float(array.mean()),
        "histogram": {"edges": [float(e) for e in edges], "counts": counts.tolist()},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as readable text."""
    policy = (
        f"policy: on_bad_sample={report['on_bad_sample']}, "
        f"max_bad_fraction={report['max_bad_fraction']}, max_length={report['max_length']}"
    )
    lines = [policy]
    for name, entry in report["datasets"].items():
        lines += ["", f"== {name}: {entry['num_samples']} samples, {entry['num_bad']} bad"]
        if entry["measured"] < entry["num_samples"] - entry["num_bad"]:
            lines.append(f"token lengths measured on {entry['measured']} samples (seeded subset)")
        for key, title in (
            ("text_tokens", "text tokens"),
            ("image_tokens", "image tokens"),
            ("total_tokens", "total tokens"),
            ("label_tokens", "reply (label) tokens"),
        ):
            lines += _histogram_lines(title, entry[key])
        if report["max_length"] is not None and entry["measured"]:
            lines.append(
                f"over max_length={report['max_length']}: {entry['over_max_length']} of "
                f"{entry['measured']} ({100 * entry['over_max_length_share']:.1f}%); the collate "
                "drops or truncates these"
            )
        if entry.get("samples_per_s"):
            lines.append(
                f"preprocessing: {entry['samples_per_s']:.1f} samples/s in one process (reading, "
                "chat template, image processor); a training run that takes more samples/s than "
                "dataloader.num_workers x this waits for data"
            )
        for sample in entry["bad"]:
            stage = " (on decode)" if sample["stage"] == "decode" else ""
            lines.append(f"bad sample {sample['where']}: {sample['reason']}{stage}")
        verdict = "ok" if entry["ok"] else "FAILS the policy"
        lines.append(
            f"{name}: {entry['num_bad']} bad of {entry['num_samples']}, "
            f"{entry['allowed_bad']} allowed: {verdict}"
        )
    lines += ["", "data check: ok" if report["ok"] else "data check: FAILED"]
    return "\n".join(lines)


def _histogram_lines(title: str, stats: dict[str, Any]) -> list[str]:
    if not stats.get("count"):
        return [f"{title}: none measured"]
    summary = (
        f"{title}: min {stats['min']}  p50 {stats['p50']:g}  p90 {stats['p90']:g}  "
        f"p99 {stats['p99']:g}  max {stats['max']}"
    )
    lines = [summary]
    counts, edges = stats["histogram"]["counts"], stats["histogram"]["edges"]
    if len(counts) < 2:
        return lines
    peak = max(counts)
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * round(BAR * count / peak) if peak else ""
        lines.append(f"  {int(lo):>6}-{int(np.ceil(hi)) - 1:<6} {bar:<{BAR}} {count}")
    return lines


# ------------------------------------------------------------------------------ one sample shown
@dataclass
class RenderedSample:
    """One collated row as the model sees it.

    Attributes:
        text: the decoded row, each run of labelled tokens between ``LABEL_OPEN`` and
            ``LABEL_CLOSE`` and each run of one repeated image token written once with its count
            (``<image_soft_token>×256``).
        label_runs: the token ids of each run of consecutive labelled positions, in order.
        image_tokens: image placeholders and the markers around them (``image_token_ids``).
        prompt_tokens: every other unlabelled token (system, prompt, template); no padding.
        label_tokens: labelled tokens; the three counts add up to ``length``.
        length: the row's tokens without padding.
    """

    text: str
    label_runs: list[list[int]]
    image_tokens: int
    prompt_tokens: int
    label_tokens: int
    length: int


def render_sample(batch: dict[str, Any], row: int, processor: Any) -> RenderedSample:
    """Row ``row`` of a collated batch as readable text with its labels marked.

    Args:
        batch: a collate's output (``input_ids``, ``labels``, ``attention_mask``).
        row: the row to render.
        processor: the processor the batch was rendered with (its tokenizer decodes the row).

    Returns:
        The rendered row and its token counts.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    keep = batch["attention_mask"][row].bool()
    ids = batch["input_ids"][row][keep].tolist()
    labelled = (batch["labels"][row][keep] != IGNORE_INDEX).tolist()
    image_ids = set(collate.image_token_ids(processor))
    runs = _runs(ids, labelled, image_ids)
    counts = {"image": 0, "prompt": 0, "label": 0}
    pieces, label_runs = [], []
    for kind, start, end in runs:
        counts[kind] += end - start
        if kind == "image":
            token = tokenizer.convert_ids_to_tokens(ids[start])
            pieces.append(token if end - start == 1 else f"{token}\u00d7{end - start}")
            continue
        text = _decoded_span(tokenizer, ids, start, end)
        if kind == "label":
            label_runs.append(ids[start:end])
            text = f"{LABEL_OPEN}{text}{LABEL_CLOSE}"
        pieces.append(text)
    return RenderedSample(
        text="".join(pieces),
        label_runs=label_runs,
        image_tokens=counts["image"],
        prompt_tokens=counts["prompt"],
        label_tokens=counts["label"],
        length=len(ids),
    )


def _runs(ids: list[int], labelled: list[bool], image_ids: set[int]) -> list[tuple[str, int, int]]:
    """``(kind, start, end)`` for each run of positions of one kind (``image``: also one id)."""
    runs: list[tuple[str, int, int]] = []
    for pos, (token, label) in enumerate(zip(ids, labelled)):
        kind = "image" if token in image_ids else "label" if label else "prompt"
        if runs and runs[-1][0] == kind and (kind != "image" or ids[runs[-1][1]] == token):
            runs[-1] = (kind, runs[-1][1], pos + 1)
        else:
            runs.append((kind, pos, pos + 1))
    return runs


def _decoded_span(tokenizer: Any, ids: list[int], start: int, end: int) -> str:
    """The text tokens ``start:end`` add to the decoded row.

    Decoded as the difference of two prefixes, not alone: some decoders drop a leading space
    from the first token they see (Llama's), which would glue a reply to its prompt.
    """

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(
            tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    before, upto = decode(ids[:start]), decode(ids[:end])
    if start and upto.startswith(before):
        return upto[len(before) :]
    return decode(ids[start:end])


def show_samples(
    dataset: Any, name: str, collate_fn: Any, processor: Any, n: int
) -> list[dict[str, Any]]:
    """The first ``n`` readable samples of ``dataset``, each collated alone and rendered.

    Args:
        dataset: the dataset as the config builds it.
        name: its config section, for the samples' locations.
        collate_fn: the configured collate (processor bound): the rows are what training sees.
        processor: the processor the collate renders with.
        n: how many samples to show.

    Returns:
        One entry per row (a sample whose template renders history differently from
        generation trains as one row per reply): ``where`` and either the
        ``RenderedSample``'s fields or ``dropped`` (why the collate left it out). Samples
        that cannot be read are passed over; the report lists them as bad.
    """
    shown: list[dict[str, Any]] = []
    taken = 0
    for i in range(len(dataset)):
        if taken == n:
            break
        try:
            example = dataset[i]
        except Exception:  # noqa: BLE001, S112 - a bad sample: the report lists it
            continue
        taken += 1
        entry: dict[str, Any] = {"where": sample_location(dataset, i, name)}
        try:
            batch = collate_fn([example])
        except Exception as exc:  # noqa: BLE001 - on_overlength: error, a broken sample
            batch, entry["dropped"] = None, str(exc)
        shown += _entries(entry, batch, example, collate_fn, processor)
    return shown


def _entries(
    entry: dict[str, Any], batch: dict | None, example: dict, collate_fn: Any, processor: Any
) -> list[dict[str, Any]]:
    """A sample's shown entries: one per row of its batch (a template that renders history
    differently from generation gives one row per reply), or one saying why it was dropped."""
    if batch is not None and not batch.get("dropped"):
        rows = batch["input_ids"].shape[0]
        return [
            {
                "where": entry["where"] + (f", row {row + 1} of {rows}" if rows > 1 else ""),
                **vars(render_sample(batch, row, processor)),
            }
            for row in range(rows)
        ]
    if batch is not None:
        entry["dropped"] = batch["dropped"][0][1]
    elif "dropped" not in entry:
        entry["dropped"] = _drop_reason(example, collate_fn, processor)
    return [entry]


def _drop_reason(example: dict, collate_fn: Any, processor: Any) -> str:
    """Why the collate returned no batch for a sample on its own (the default collate gives
    its reasons only beside a batch): the collate's sample check, else its length verdict."""
    try:
        problem = collate.sample_problem(example["conversation"], processor)
        if problem:
            return problem
        collate_fn([example], on_overlength="error")
    except TypeError:  # a collate of the user's own, without on_overlength
        pass
    except Exception as exc:  # noqa: BLE001 - the verdict is the message
        return str(exc).removeprefix("sample batch item 0: ")  # the collate's name for it
    return "the collate returned no batch for it"


def format_samples(name: str, samples: list[dict[str, Any]]) -> str:
    """Rendered samples as text: each one's location, text and token counts."""
    title = (
        f"== {name}: {len(samples)} sample(s) as the collate renders them, labelled tokens "
        f"between {LABEL_OPEN} and {LABEL_CLOSE}"
    )
    lines = [title]
    for number, sample in enumerate(samples, 1):
        lines.append(f"-- sample {number}: {sample['where']}")
        if "dropped" in sample:
            lines.append(f"dropped by the collate: {sample['dropped']}")
            continue
        counts = (
            f"tokens: {sample['length']} = {sample['image_tokens']} image + "
            f"{sample['prompt_tokens']} prompt + {sample['label_tokens']} label"
        )
        lines += [sample["text"], counts]
    return "\n".join(lines)
