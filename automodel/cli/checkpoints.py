"""``automodel checkpoints verify DIR``."""

from __future__ import annotations

from pathlib import Path

from automodel.cli.common import command


def add_parsers(sub, parents) -> None:
    checkpoints = sub.add_parser(
        "checkpoints",
        help="checkpoint utilities (verify)",
        description="Checkpoint utilities.",
        epilog="example:\n  automodel checkpoints verify checkpoints/",
    )
    actions = checkpoints.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = command(
        actions,
        "verify",
        run_verify,
        help="check every step checkpoint of a run's folder against its recorded hashes",
        description="Check every step folder of a checkpoint_dir: each file meta.json records is "
        "there with\nits size and SHA-256; report the pointers (LATEST, LOWEST_VAL, BEST) and "
        "unfinished writes.\nExit code 0 when every step folder is intact, 1 when one is not.",
        epilog="example:\n  automodel checkpoints verify checkpoints/",
    )
    verify.add_argument("dir", type=Path, metavar="DIR", help="a run's checkpoint_dir")


def run_verify(ns, overrides: list[str]) -> int:
    from automodel.training.checkpoint import verify_dir

    lines, intact = verify_dir(ns.dir)
    print("\n".join(lines))
    return 0 if intact else 1
