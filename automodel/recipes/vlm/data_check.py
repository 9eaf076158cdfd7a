"""``automodel data check``: a config's datasets as the fine-tuning run would build them,
scanned and measured before a long run (``datasets/data_check.py`` holds the per-dataset scan
and the report's text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from automodel.config.sections import DataCheckConfig
from automodel.datasets.checks import allowed_bad
from automodel.datasets.data_check import (
    check_dataset,
    format_report,
    format_samples,
    show_samples,
)
from automodel.recipes.vlm.builders import (
    DATASET_SECTIONS,
    build_collate,
    build_dataset,
    build_processor,
    run_prepare,
)


def check_config(
    cfg: dict,
    max_samples: int = 1000,
    json_path: str | Path | None = None,
    seed: int = 0,
    show: int = 0,
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
        show: print the first ``show`` training samples as ``dataloader.collate_fn`` renders
            them, labelled tokens marked, with their image / prompt / label token counts.

    Returns:
        The exit code: 0 when every dataset is within the bad-sample policy, else 1.
    """
    run_prepare(cfg)
    policy = DataCheckConfig.from_dict(cfg.get("data_check") or {})
    processor = build_processor(cfg)
    max_length = (cfg.get("dataloader") or {}).get("collate_fn", {}).get("max_length")

    report: dict[str, Any] = {
        "on_bad_sample": policy.on_bad_sample,
        "max_bad_fraction": policy.max_bad_fraction,
        "max_length": max_length,
        "datasets": {},
    }
    ok = True
    for name in DATASET_SECTIONS:
        if not cfg.get(name):
            continue
        dataset = build_dataset(cfg, name)
        if show and name == "dataset":
            samples = show_samples(dataset, name, build_collate(cfg, processor), processor, show)
            report["samples"] = samples
            print(format_samples(name, samples) + "\n")
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
