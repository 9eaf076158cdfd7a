"""What every command shares: a parser that reports errors in one line, the parent parsers
(``-c``, config overrides, ``--nproc-per-node``) and loading a config."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from automodel.errors import UsageError

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "vlm" / "quickstart.yaml"

OVERRIDES_HELP = """\
Arguments that are not options of the command change the config, in order, values parsed as YAML:
  --section.key=value   set a key
  --section.key value   the same
  ~section.key          delete a key"""


class Parser(argparse.ArgumentParser):
    """argparse with raw help text, no abbreviated options, and errors raised as UsageError."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --out must not swallow an override --output.x
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(message)


class Parents:
    """The parent parsers a command picks from."""

    def __init__(self) -> None:
        self.config = Parser(add_help=False)
        self.config.add_argument(
            "-c", "--config", type=Path, metavar="CONFIG.yaml", help="the run's YAML"
        )
        self.overrides = Parser(add_help=False)
        self.overrides.add_argument_group("config overrides", OVERRIDES_HELP)
        self.nproc = Parser(add_help=False)
        self.nproc.add_argument(
            "--nproc-per-node",
            default="1",
            metavar="N",
            help="run N processes on this machine (through torchrun; default 1)",
        )


def command(sub, name: str, run, parents: list | None = None, overrides: bool = False, **kw):
    """Adds a subcommand whose ``run(namespace, overrides)`` does the work."""
    parser = sub.add_parser(name, parents=parents or [], **kw)
    parser.set_defaults(run=run, takes_overrides=overrides, parser=parser)
    return parser


def reject_unknown(parser: argparse.ArgumentParser, extras: list[str], overrides: bool) -> None:
    """Names the closest option for an argument the command does not take.

    With config overrides, ``--name`` without a dot that is close to an option is a typo of the
    option; anything else is an override, checked against the config later.

    Raises:
        UsageError: an argument is neither an option of the command nor (where taken) an override.
    """
    known = parser._option_string_actions
    options = sorted(s for s in known if s.startswith("--"))
    for arg in extras:
        name = arg.split("=", 1)[0]
        if name in known or _is_number(arg):
            continue
        if overrides and (not name.startswith("--") or "." in name):
            continue
        near = difflib.get_close_matches(name, options, n=1, cutoff=0.8 if overrides else 0.6)
        if overrides and not near:
            continue
        if not name.startswith("-"):
            raise UsageError(f"unexpected argument {arg!r} (see: {parser.prog} --help)")
        hint = f"did you mean {near[0]}?" if near else f"options: {', '.join(options)}"
        raise UsageError(f"unknown option {name}; {hint}")


def leaf_parser(parser: argparse.ArgumentParser, args: list[str]) -> argparse.ArgumentParser:
    """The (sub)command parser that ``args`` name by their leading words."""
    for word in args:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            break
        if word not in subparsers[0].choices:
            if word.startswith("-"):
                break
            near = difflib.get_close_matches(word, list(subparsers[0].choices), n=1)
            hint = (
                f"did you mean {near[0]}?" if near else f"one of {', '.join(subparsers[0].choices)}"
            )
            raise UsageError(f"unknown command {word!r} for {parser.prog}; {hint}")
        parser = subparsers[0].choices[word]
    return parser


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def positive(name: str, value) -> int | None:
    """``value`` as a positive integer (None stays None)."""
    if value is None:
        return None
    if not str(value).isdigit() or int(value) < 1:
        raise UsageError(f"{name} {value}: give a positive integer")
    return int(value)


def config_path(ns: argparse.Namespace, default: Path | None = None) -> Path:
    if ns.config is None and default is None:
        raise UsageError("no config given: pass -c CONFIG.yaml")
    return ns.config or default


def load(config: Path, overrides: list[str]) -> dict:
    """The config file with the overrides applied and environment variables interpolated."""
    from automodel.config.loader import load_config, parse_overrides

    return load_config(config, parse_overrides(overrides))


def quiet_libraries() -> None:
    """Turns off per-file progress bars and known-harmless warnings of the libraries we drive."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    # torchdata 0.11 warns about its own internal call on every DataLoader iterator.
    warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")
