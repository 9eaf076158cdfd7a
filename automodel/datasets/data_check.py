"""``automodel data check``: what a config's data looks like to the model, before a long run.

For each of ``dataset`` and ``validation_dataset``: the sample count, every bad sample with its
``file:line`` (or row) and reason, and histograms of text and image-token lengths as the collate
renders them (the processor's chat template), with the share over
``dataloader.collate_fn.max_length``. The exit code says whether training would start:
non-zero when a dataset has more bad samples than ``data_check`` tolerates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automodel.config.instantiate import instantiate
from automodel.config.sections import DataCheckConfig
from automodel.datasets import collate
from automodel.datasets.checks import (
    BadSample,
    allowed_bad,
    sample_location,
    scan_dataset,
)
from automodel.loss.masked_ce import IGNORE_INDEX

SECTIONS = ("dataset", "validation_dataset")
BAR = 30


def check_config(
    cfg: dict, max_samples: int = 1000, json_path: str | Path | None = None, seed: int = 0
) -> int:
    """Check the data of a resolved fine-tuning config and print the report.

    Args:
        cfg: the resolved config (``resolve_config``): its ``prepare``, ``processor`` /
            ``model``, ``dataset``, ``validation_dataset``, ``dataloader.collate_fn`` and
            ``data_check`` sections are read.
        max_samples: token lengths are measured on at most this many samples per dataset (a
            seeded random subset); ``0`` measures every sample. Bad samples are always scanned
            for in full.
        json_path: also write the report as JSON here.
        seed: the subset's seed.

    Returns:
        The exit code: 0 when every dataset is within the bad-sample policy, else 1.
    """
    extra = tuple(cfg.get("allowed_target_prefixes") or ())
    for i, node in enumerate(cfg.get("prepare") or []):
        instantiate(node, where=f"prepare[{i}]", extra_prefixes=extra)
    policy = DataCheckConfig.from_dict(cfg.get("data_check") or {})
    processor = _processor(cfg, extra)
    max_length = (cfg.get("dataloader") or {}).get("collate_fn", {}).get("max_length")

    report: dict[str, Any] = {
        "on_bad_sample": policy.on_bad_sample,
        "max_bad_fraction": policy.max_bad_fraction,
        "max_length": max_length,
        "datasets": {},
    }
    ok = True
    for name in SECTIONS:
        if not cfg.get(name):
            continue
        dataset = instantiate(cfg[name], where=name, extra_prefixes=extra)
        entry = check_dataset(dataset, name, processor, max_length, max_samples, seed)
        allowed = allowed_bad(entry["num_samples"], policy)
        entry["allowed_bad"] = allowed
        entry["ok"] = entry["num_bad"] <= allowed
        ok = ok and entry["ok"]
        report["datasets"][name] = entry
    report["ok"] = ok
    print(format_report(report))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report written to {json_path}")
    return 0 if ok else 1


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
    if max_samples and len(good) > max_samples:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(good), size=max_samples, replace=False).tolist())
        measure = [good[i] for i in chosen]
    else:
        measure = list(good)
    image_ids = torch.tensor(collate.image_token_ids(processor))
    # The collate's own per-sample verdict (special tokens in text, images in replies ...).
    collate_problem = getattr(collate, "sample_problem", None)
    text, images, totals, labels = [], [], [], []
    start = time.perf_counter()
    for i in measure:
        try:
            conversation = dataset[i]["conversation"]
            problem = collate_problem(conversation, processor) if collate_problem else None
            batch = None if problem else collate.render_batch([conversation], processor)
        except Exception as exc:  # noqa: BLE001 - one sample's failure is reported, not fatal
            problem = str(exc) if exc.__class__.__name__ == "BadSampleError" else repr(exc)
        if problem:
            bad.append(BadSample(name, sample_location(dataset, i, name), problem, "decode"))
            continue
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
        n_image = int(torch.isin(ids, image_ids).sum())
        totals.append(len(ids))
        images.append(n_image)
        text.append(len(ids) - n_image)
        labels.append(int((batch["labels"][0] != IGNORE_INDEX).sum()))
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


def _processor(cfg: dict, extra: tuple[str, ...]) -> Any:
    from automodel.models.auto import load_processor

    if cfg.get("processor"):
        return instantiate(cfg["processor"], where="processor", extra_prefixes=extra)
    return load_processor(cfg["model"]["pretrained_model_name_or_path"])
