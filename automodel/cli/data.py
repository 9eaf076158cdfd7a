"""``automodel data make-receipts OUT_DIR``, ``automodel data check -c CONFIG.yaml`` and
``automodel data cache-features -c CONFIG.yaml``."""

from __future__ import annotations

from pathlib import Path

from automodel.cli.common import command, config_path, load, quiet_libraries
from automodel.errors import UsageError


def add_parsers(sub, parents) -> None:
    data = sub.add_parser(
        "data",
        help="data utilities (make-receipts, check, cache-features)",
        description="Data utilities.",
        epilog="example:\n  automodel data check -c examples/data/conversation/finetune.yaml",
    )
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    receipts = command(
        actions,
        "make-receipts",
        run_make_receipts,
        help="write synthetic receipts in CORD-v2's schema",
        description="Write deterministic synthetic receipts in CORD-v2's schema\n"
        "(train, validation and test parquet splits).",
        epilog="example:\n  automodel data make-receipts data/receipts --n 200",
    )
    receipts.add_argument("out_dir", type=Path, help="the folder to write")
    receipts.add_argument("--n", type=int, default=1000, help="training receipts (default 1000)")
    receipts.add_argument("--seed", type=int, default=0, help="default 0")
    check = command(
        actions,
        "check",
        run_check,
        [parents.config, parents.overrides],
        overrides=True,
        help="scan a config's datasets: counts, lengths, bad samples",
        description="Scan the config's dataset and validation_dataset: sample counts, every bad "
        "sample with its\nfile:line (or row) and reason, histograms of text and image-token "
        "lengths through the model's\nchat template, and the share over "
        "dataloader.collate_fn.max_length. Exits 1 when a dataset has\nmore bad samples than "
        "data_check (on_bad_sample, max_bad_fraction) allows.",
        epilog="examples:\n  automodel data check -c examples/data/vqa/finetune.yaml --json check.json"
        "\n  automodel data check -c examples/data/vqa/finetune.yaml --show 2",
    )
    check.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    check.add_argument(
        "--max-samples",
        default="1000",
        metavar="N",
        help="measure token lengths on at most N samples per dataset, a seeded subset "
        "(default 1000; 0 = all). Bad samples are always scanned in full.",
    )
    check.add_argument(
        "--show",
        default="0",
        metavar="N",
        help="print the first N training samples as the collate renders them: the decoded "
        "text with labelled tokens between \u27e6 and \u27e7, image-token runs collapsed, and "
        "their image / prompt / label token counts (default 0)",
    )
    command(
        actions,
        "cache-features",
        run_cache_features,
        [parents.config, parents.overrides],
        overrides=True,
        help="compute a config's frozen vision-tower features into its disk cache",
        description="Run every image of the config's dataset and validation_dataset through "
        "the frozen vision tower\nonce, as the fine-tuning run would (same model, precision and "
        "device), and store the outputs\nin vision_cache.path for the run to read. The config "
        "needs vision_cache.enabled=true and\nvision_cache.storage=disk. Images already cached "
        "are not computed again.",
        epilog="example (the config has vision_cache: {enabled: true, storage: disk}):\n"
        "  automodel data cache-features -c finetune.yaml\n"
        "  automodel finetune vlm -c finetune.yaml",
    )


def run_make_receipts(ns, overrides: list[str]) -> int:
    from automodel.demo.receipts import make_receipts

    print(make_receipts(ns.out_dir, n=ns.n, seed=ns.seed))
    return 0


def run_check(ns, overrides: list[str]) -> int:
    if not ns.max_samples.isdigit():
        raise UsageError(f"--max-samples {ns.max_samples}: give a whole number")
    if not ns.show.isdigit():
        raise UsageError(f"--show {ns.show}: give a whole number")
    config = config_path(ns)
    from automodel.recipes.vlm.config import resolve_config
    from automodel.recipes.vlm.data_check import check_config

    resolved, _ = resolve_config(load(config, overrides))
    quiet_libraries()
    return check_config(
        resolved, max_samples=int(ns.max_samples), json_path=ns.json, show=int(ns.show)
    )


def run_cache_features(ns, overrides: list[str]) -> int:
    config = config_path(ns)
    from automodel.recipes.vlm.cache_features import cache_features
    from automodel.recipes.vlm.config import resolve_config

    resolved, _ = resolve_config(load(config, overrides))
    quiet_libraries()
    return cache_features(resolved)
