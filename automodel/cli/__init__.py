"""The ``automodel`` command: one module per command group, argparse subcommands.

    automodel finetune vlm -c CFG.yaml [--a.b=v | --a.b v | ~a.b ...]
    automodel CFG.yaml [overrides ...]                 (short form: the recipe CFG.yaml names,
    automodel -c CFG.yaml [overrides ...]               in its top-level `recipe:` key)
    automodel validate | data check | evaluate -c CFG.yaml [options] [overrides ...]
    automodel models make-tiny | data make-receipts | generate | report | export merge-lora
    automodel checkpoints verify DIR ...

Bad input (a missing file, an unknown key or option, a wrong type) prints one line and exits
with code 2.
"""

from __future__ import annotations

import os
import sys

from automodel.cli import checkpoints, data, evaluate, export, finetune, generate, models
from automodel.cli.common import Parents, Parser, leaf_parser, reject_unknown
from automodel.errors import RunStopped, UsageError, error_line

USAGE_ERROR = 2
GROUPS = (finetune, models, data, generate, evaluate, export, checkpoints)


def build_parser() -> Parser:
    parser = Parser(
        prog="automodel",
        description="Fine-tune Hugging Face vision-language models from one YAML file.",
        epilog="Run 'automodel COMMAND --help' for a command's options.\n\nexample:\n"
        "  automodel finetune vlm -c examples/vlm/quickstart.yaml --step_scheduler.max_steps 20",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Set after the subparsers, whose usage lines start with the parser's prog.
    parser.usage = (
        "automodel COMMAND [args ...]\n       automodel [-c] CONFIG.yaml [overrides ...]   "
        "(the recipe its 'recipe:' names)"
    )
    parents = Parents()
    for group in GROUPS:
        group.add_parsers(sub, parents)
    return parser


def _print_once(message: str) -> None:
    """To stderr, from rank 0 only: every process of a distributed run reaches the same end."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)


def short_form(args: list[str]) -> list[str] | None:
    """NeMo AutoModel's command line, ``automodel CONFIG.yaml ...`` (or ``-c CONFIG.yaml``), as
    the command of the recipe the config names in ``recipe:``; None for any other command line.

    Raises:
        UsageError: the config names no recipe (the message says what to write), or a recipe
            automodel does not run.
    """
    if args[0].startswith("--config="):
        config, rest = args[0].split("=", 1)[1], args[1:]
    elif args[0] in ("-c", "--config") and len(args) > 1:
        config, rest = args[1], args[2:]
    elif args[0].endswith((".yaml", ".yml")):
        config, rest = args[0], args[1:]
    else:
        return None
    from automodel.config.loader import load_yaml
    from automodel.config.sections import VLM_RECIPE, check_recipe

    cfg = load_yaml(config)
    if "recipe" not in cfg:
        raise UsageError(
            f"{config} names no recipe; add the line 'recipe: {VLM_RECIPE}' at its top, or "
            f"run: automodel finetune vlm -c {config}"
        )
    check_recipe(cfg["recipe"])
    return ["finetune", "vlm", "-c", config, *rest]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if not args:
            parser.print_help()
            return 0
        args = short_form(args) or args
        # Before parsing: a mistyped option is named as such, not as a missing required one.
        leaf = leaf_parser(parser, args)
        if leaf.get_default("run") is not None:
            options = [a for a in args if a.startswith("-")]
            reject_unknown(leaf, options, leaf.get_default("takes_overrides"))
        ns, extras = parser.parse_known_args(args)
        reject_unknown(ns.parser, extras, ns.takes_overrides)
        return ns.run(ns, extras)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        _print_once(f"error: {error_line(e)}")
        return USAGE_ERROR
    except RunStopped as e:  # SIGTERM (exit 143), repeated non-finite steps, a failed save (1)
        _print_once(f"stopped: {error_line(e)}")
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
