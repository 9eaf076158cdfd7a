"""The ``automodel`` command.

    automodel finetune vlm -c CFG.yaml [--a.b=v | --a.b v | ~a.b ...]
    automodel CFG.yaml [overrides ...]                 (short form of the above)
    automodel validate -c CFG.yaml [overrides ...]
    automodel models make-tiny FAMILY OUT_DIR [--seed N]
    automodel data make-receipts OUT_DIR [--n N] [--seed N]
    automodel data check -c CFG.yaml [--json PATH] [--max-samples N] [overrides ...]
    automodel generate --model DIR --image IMG|DIR --prompt TEXT [--out PRED.jsonl]
    automodel generate --model DIR --jsonl PROMPTS.jsonl [--out PRED.jsonl]
    automodel evaluate -c CFG.yaml --model DIR [--split S] [--max-samples N] [--out DIR]
    automodel report RUN_DIR [--out FILE.html]
    automodel export merge-lora --base B --adapter A --out O

Bad input (a missing file, an unknown key, a wrong type) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from automodel.errors import UsageError
from automodel.training.signals import RunStopped

USAGE_ERROR = 2
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "vlm" / "quickstart.yaml"

CONFIG_HELP = """\
usage: automodel {command} -c CONFIG.yaml [overrides ...]

{what}

options:
  -c, --config CONFIG.yaml   the run's YAML ({default})
  -h, --help                 show this help

overrides (applied in order, values parsed as YAML):
  --section.key=value        set a key
  --section.key value        the same
  ~section.key               delete a key

example:
  automodel {command} -c examples/vlm/quickstart.yaml --step_scheduler.max_steps 20
"""


def _config_help(command: str, what: str, default: str) -> str:
    return CONFIG_HELP.format(command=command, what=what, default=default)


def _split_config_args(args: list[str], default: Path | None) -> tuple[Path, list[str], int]:
    """Separates ``-c CONFIG`` and ``--nproc-per-node N`` from the overrides."""
    config, nproc, rest = None, 1, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "--config", "--nproc-per-node"):
            if i + 1 >= len(args):
                raise UsageError(f"{arg} needs a value")
            value = args[i + 1]
            i += 2
        elif arg.startswith(("--config=", "--nproc-per-node=")):
            arg, value = arg.split("=", 1)
            i += 1
        else:
            rest.append(arg)
            i += 1
            continue
        if arg == "--nproc-per-node":
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"--nproc-per-node {value}: give a positive integer")
            nproc = int(value)
        else:
            config = Path(value)
    if config is None:
        if default is None:
            raise UsageError("no config given: pass -c CONFIG.yaml")
        config = default
    return config, rest, nproc


def _load(config: Path, rest: list[str]) -> dict:
    from automodel.config.loader import load_config, parse_overrides

    return load_config(config, parse_overrides(rest))


def cmd_finetune(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print("usage: automodel finetune vlm -c CONFIG.yaml [overrides ...]\n\nrecipes: vlm")
        return 0
    if args[0] != "vlm":
        raise UsageError(
            f"unknown recipe {args[0]!r}: the recipe is 'vlm' (automodel finetune vlm -c ...)"
        )
    args = args[1:]
    if "-h" in args or "--help" in args:
        print(
            _config_help(
                "finetune vlm", "Fine-tune a vision-language model.", f"default: {QUICKSTART.name}"
            )
        )
        return 0
    config, rest, nproc = _split_config_args(args, QUICKSTART)
    cfg = _load(config, rest)
    from automodel.distributed.launch import launched_by_torchrun, relaunch

    if nproc > 1 and not launched_by_torchrun():
        from automodel.recipes.vlm.config import resolve_config

        resolve_config(cfg)  # a bad config stops here, once, not in every process
        return relaunch(nproc, ["finetune", "vlm", "-c", str(config), *rest])
    _quiet_libraries()
    from automodel.recipes.vlm.finetune import run

    run(cfg)
    return 0


def _quiet_libraries() -> None:
    """Turns off per-file progress bars and known-harmless warnings of the libraries we drive."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    # torchdata 0.11 warns about its own internal call on every DataLoader iterator.
    warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")


def cmd_validate(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(
            _config_help(
                "validate", "Resolve every _target_ and key of a config; no training.", "required"
            )
        )
        return 0
    config, rest, _ = _split_config_args(args, None)
    from automodel.config.loader import dump_yaml
    from automodel.recipes.vlm.config import resolve_config

    resolved, notices = resolve_config(_load(config, rest))
    print(dump_yaml(resolved), end="")
    for notice in notices:
        print(notice)
    print(f"{config}: ok")
    return 0


def cmd_models(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="automodel models", description="Model utilities.")
    sub = parser.add_subparsers(dest="action", required=True)
    tiny = sub.add_parser(
        "make-tiny",
        help="write a tiny randomly initialised twin of a real VLM family",
        description="Write a tiny, randomly initialised model of a real transformers VLM class, "
        "with a locally trained tokenizer and the family's processor, as a Hugging Face folder.",
    )
    tiny.add_argument(
        "family",
        help="the family whose twin to build (docs/families.md lists the twins)",
    )
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    from automodel.twins import make_tiny

    out = make_tiny(ns.family, ns.out_dir, seed=ns.seed)
    print(out)
    return 0


DATA_CHECK_HELP = """\
usage: automodel data check -c CONFIG.yaml [--json PATH] [--max-samples N] [overrides ...]

Scan the config's dataset and validation_dataset: sample counts, every bad sample with its
file:line (or row) and reason, histograms of text and image-token lengths through the model's
chat template, and the share over dataloader.collate_fn.max_length. Exits 1 when a dataset has
more bad samples than data_check (on_bad_sample, max_bad_fraction) allows.

options:
  -c, --config CONFIG.yaml   the run's YAML (required)
  --json PATH                also write the report as JSON
  --max-samples N            measure token lengths on at most N samples per dataset, a seeded
                             subset (default 1000; 0 = all). Bad samples are always scanned in full.
"""


def cmd_data_check(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(DATA_CHECK_HELP)
        return 0
    options = {"--json": None, "--max-samples": "1000"}
    rest: list[str] = []
    i = 0
    while i < len(args):
        name, _, value = args[i].partition("=")
        if name in options:
            if not value:
                if i + 1 >= len(args):
                    raise UsageError(f"{name} needs a value")
                i += 1
                value = args[i]
            options[name] = value
        else:
            rest.append(args[i])
        i += 1
    if not options["--max-samples"].isdigit():
        raise UsageError(f"--max-samples {options['--max-samples']}: give a whole number")
    config, rest, _ = _split_config_args(rest, None)
    from automodel.recipes.vlm.config import resolve_config
    from automodel.recipes.vlm.data_check import check_config

    resolved, _ = resolve_config(_load(config, rest))
    _quiet_libraries()
    return check_config(
        resolved, max_samples=int(options["--max-samples"]), json_path=options["--json"]
    )


def cmd_data(args: list[str]) -> int:
    if args and args[0] == "check":
        return cmd_data_check(args[1:])
    parser = argparse.ArgumentParser(prog="automodel data", description="Data utilities.")
    sub = parser.add_subparsers(dest="action", required=True)
    receipts = sub.add_parser(
        "make-receipts",
        help="write synthetic receipts in CORD-v2's schema",
        description="Write deterministic synthetic receipts in CORD-v2's schema "
        "(train, validation and test parquet splits).",
    )
    sub.add_parser("check", help="scan a config's datasets (see: automodel data check --help)")
    receipts.add_argument("out_dir", type=Path)
    receipts.add_argument("--n", type=int, default=1000, help="training receipts (default 1000)")
    receipts.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    from automodel.demo.receipts import make_receipts

    print(make_receipts(ns.out_dir, n=ns.n, seed=ns.seed))
    return 0


def cmd_generate(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="automodel generate",
        description="Reply to an image and a prompt with a model. With a folder of images or a "
        "JSONL of prompts, write one prediction per line to --out.",
    )
    parser.add_argument("--model", required=True, type=Path, help="a Hugging Face model folder")
    parser.add_argument("--image", type=Path, help="an image file, or a folder of images")
    parser.add_argument(
        "--jsonl", type=Path, help='a file of {"image": PATH, "prompt": TEXT} lines'
    )
    parser.add_argument("--prompt", help="the instruction (for --image, or JSONL lines without)")
    parser.add_argument(
        "--out", type=Path, help="predictions JSONL (default predictions.jsonl for many inputs)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    ns = parser.parse_args(args)
    if (ns.image is None) == (ns.jsonl is None):
        raise UsageError("give one of --image (a file or a folder) and --jsonl")
    if ns.batch_size < 1:
        raise UsageError(f"--batch-size {ns.batch_size}: give a positive integer")
    from automodel.generation import (
        generate_reply,
        generate_to_jsonl,
        item_messages,
        read_generation_inputs,
    )
    from automodel.models.auto import AutoModelForImageTextToText, load_processor

    items = read_generation_inputs(ns.image, ns.jsonl, ns.prompt)
    model = AutoModelForImageTextToText.from_pretrained(str(ns.model))
    processor = load_processor(str(ns.model))
    single = ns.jsonl is None and ns.image.is_file() and ns.out is None
    if single:
        print(generate_reply(model, processor, item_messages(items[0]), ns.max_new_tokens))
        return 0
    out = generate_to_jsonl(
        model,
        processor,
        items,
        ns.out or Path("predictions.jsonl"),
        ns.max_new_tokens,
        ns.batch_size,
    )
    print(f"wrote {len(items)} predictions to {out}")
    return 0


def _pop_options(args: list[str], options: dict[str, str | None]) -> tuple[dict, list[str]]:
    """Takes ``--name value`` / ``--name=value`` options out of ``args``; the rest are overrides."""
    found, rest = dict(options), []
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in options:
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"{name} needs a value")
                i += 1
                value = args[i]
            found[name] = value
        else:
            rest.append(args[i])
        i += 1
    return found, rest


def _positive(options: dict, name: str) -> int | None:
    value = options[name]
    if value is None:
        return None
    if not str(value).isdigit() or int(value) < 1:
        raise UsageError(f"{name} {value}: give a positive integer")
    return int(value)


EVALUATE_HELP = """\
usage: automodel evaluate -c CONFIG.yaml --model DIR [--split S] [--max-samples N]
                          [--out DIR] [--batch-size N] [overrides ...]

Generate a reply (greedy, batched) for every sample of the config's validation_dataset and
score it with the dataset's task metrics (eval.metrics overrides them). Prints a Markdown table
and writes metrics.json, predictions.jsonl and images/ to --out.

options:
  -c, --config CONFIG.yaml   the run's YAML (required)
  --model DIR                the model folder to evaluate, e.g. checkpoints/final_model
  --split S                  the split to read instead of the config's (e.g. test)
  --max-samples N            evaluate only the first N samples
  --out DIR                  output folder (default: eval_<split>/ beside the model folder)
  --batch-size N             prompts per generate call (default eval.batch_size)
"""


def cmd_evaluate(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(EVALUATE_HELP)
        return 0
    names = ("--model", "--split", "--max-samples", "--out", "--batch-size")
    options, rest = _pop_options(args, dict.fromkeys(names))
    if options["--model"] is None:
        raise UsageError("--model is required: the model folder to evaluate")
    max_samples = _positive(options, "--max-samples")
    batch_size = _positive(options, "--batch-size")
    config, rest, _ = _split_config_args(rest, None)
    from automodel.eval.evaluate import markdown_table
    from automodel.recipes.vlm.config import resolve_config
    from automodel.recipes.vlm.evaluate import run_evaluation

    resolved, _ = resolve_config(_load(config, rest))
    _quiet_libraries()
    result, out = run_evaluation(
        resolved,
        options["--model"],
        split=options["--split"],
        max_samples=max_samples,
        out_dir=options["--out"],
        batch_size=batch_size,
    )
    print(markdown_table(result.scores, f"metric ({len(result.records)} samples)"))
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")
    return 0


def cmd_report(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="automodel report",
        description="Write RUN_DIR/report.html: loss and metric curves, scores, the resolved "
        "config and a gallery of validation predictions, in one self-contained file.",
    )
    parser.add_argument("run_dir", type=Path, help="the run's checkpoint_dir")
    parser.add_argument("--out", type=Path, help="the HTML file (default RUN_DIR/report.html)")
    ns = parser.parse_args(args)
    from automodel.eval.report import write_report

    print(write_report(ns.run_dir, ns.out))
    return 0


def cmd_export(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="automodel export", description="Export utilities.")
    sub = parser.add_subparsers(dest="action", required=True)
    merge = sub.add_parser(
        "merge-lora",
        help="merge a LoRA adapter into its base model",
        description="Load a base model, apply a PEFT LoRA adapter, merge it into the weights and "
        "write an ordinary Hugging Face folder with the processor and chat template.",
    )
    merge.add_argument("--base", required=True, help="base model folder or hub id")
    merge.add_argument("--adapter", required=True, type=Path, help="PEFT adapter folder")
    merge.add_argument("--out", required=True, type=Path, help="where to write the merged model")
    ns = parser.parse_args(args)
    from automodel.peft.export import merge_lora

    print(merge_lora(ns.base, ns.adapter, ns.out))
    return 0


COMMANDS = {
    "finetune": (cmd_finetune, "fine-tune a model (finetune vlm -c CONFIG.yaml)"),
    "validate": (cmd_validate, "check a config without training"),
    "models": (cmd_models, "model utilities (make-tiny)"),
    "data": (cmd_data, "data utilities (make-receipts, check)"),
    "generate": (cmd_generate, "reply to images and prompts with a trained model"),
    "evaluate": (cmd_evaluate, "task metrics of a model on a config's validation data"),
    "report": (cmd_report, "write a run's report.html (curves, config, predictions)"),
    "export": (cmd_export, "export utilities (merge-lora)"),
}


def _main_help() -> str:
    lines = [
        "usage: automodel COMMAND [args ...]",
        "       automodel CONFIG.yaml [overrides ...]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'automodel COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _print_once(message: str) -> None:
    """To stderr, from rank 0 only: every process of a distributed run reaches the same end."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_main_help())
        return 0
    command, rest = args[0], args[1:]
    try:
        if command.endswith((".yaml", ".yml")):
            return cmd_finetune(["vlm", "-c", command, *rest])
        if command not in COMMANDS:
            raise UsageError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
        return COMMANDS[command][0](rest)
    except UsageError as e:
        _print_once(f"error: {e}")
        return USAGE_ERROR
    except RunStopped as e:  # SIGTERM (exit 143), repeated non-finite steps, a failed save (1)
        _print_once(f"stopped: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
