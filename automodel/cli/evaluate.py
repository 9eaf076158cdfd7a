"""``automodel evaluate -c CONFIG.yaml --model DIR`` and ``automodel report RUN_DIR``."""

from __future__ import annotations

from pathlib import Path

from automodel.cli.common import command, config_path, load, positive, quiet_libraries
from automodel.errors import UsageError


def add_parsers(sub, parents) -> None:
    evaluate = command(
        sub,
        "evaluate",
        run_evaluate,
        [parents.config, parents.overrides],
        overrides=True,
        help="score a model on a config's validation data",
        description="Generate a reply (greedy, batched) for every sample of the config's "
        "validation_dataset and\nscore it with the dataset's task metrics (eval.metrics "
        "overrides them). Prints a Markdown table\nand writes metrics.json, predictions.jsonl "
        "and images/ to --out.",
        epilog="example:\n  automodel evaluate -c examples/vlm/quickstart.yaml "
        "--model vlm_checkpoints/final_model --split test",
    )
    evaluate.add_argument(
        "--model", metavar="DIR", help="the model folder to evaluate (required), e.g. final_model"
    )
    evaluate.add_argument("--split", help="the split to read instead of the config's (e.g. test)")
    evaluate.add_argument("--max-samples", metavar="N", help="evaluate only the first N samples")
    evaluate.add_argument(
        "--out", metavar="DIR", help="output folder (default: eval_<split>/ beside the model)"
    )
    evaluate.add_argument(
        "--batch-size", metavar="N", help="prompts per generate call (default eval.batch_size)"
    )
    report = command(
        sub,
        "report",
        run_report,
        help="write a run's report.html (curves, scores, config, predictions)",
        description="Write RUN_DIR/report.html: loss and metric curves, scores, the resolved "
        "config and a gallery\nof validation predictions, in one self-contained file.",
        epilog="example:\n  automodel report vlm_checkpoints",
    )
    report.add_argument("run_dir", type=Path, help="the run's checkpoint_dir")
    report.add_argument("--out", type=Path, help="the HTML file (default RUN_DIR/report.html)")


def run_evaluate(ns, overrides: list[str]) -> int:
    if ns.model is None:
        raise UsageError("--model is required: the model folder to evaluate")
    max_samples = positive("--max-samples", ns.max_samples)
    batch_size = positive("--batch-size", ns.batch_size)
    config = config_path(ns)
    from automodel.eval.evaluate import markdown_table
    from automodel.recipes.vlm.config import resolve_config
    from automodel.recipes.vlm.evaluate import run_evaluation

    resolved, _ = resolve_config(load(config, overrides))
    quiet_libraries()
    result, out = run_evaluation(
        resolved,
        ns.model,
        split=ns.split,
        max_samples=max_samples,
        out_dir=ns.out,
        batch_size=batch_size,
    )
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    print(markdown_table(result.scores, f"metric ({len(result.records)} samples{skipped})"))
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")
    return 0


def run_report(ns, overrides: list[str]) -> int:
    from automodel.eval.report import write_report

    print(write_report(ns.run_dir, ns.out))
    return 0
