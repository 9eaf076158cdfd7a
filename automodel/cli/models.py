"""``automodel models make-tiny FAMILY OUT_DIR``."""

from __future__ import annotations

from pathlib import Path

from automodel.cli.common import command


def add_parsers(sub, parents) -> None:
    models = sub.add_parser(
        "models",
        help="model utilities (make-tiny)",
        description="Model utilities.",
        epilog="example:\n  automodel models make-tiny gemma3 models/tiny_gemma3",
    )
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    tiny = command(
        actions,
        "make-tiny",
        run_make_tiny,
        help="write a tiny randomly initialised twin of a real VLM family",
        description="Write a tiny, randomly initialised model of a real transformers VLM class,\n"
        "with a locally trained tokenizer and the family's processor, as a Hugging Face folder.",
        epilog="example:\n  automodel models make-tiny qwen2_vl models/tiny_qwen2_vl --seed 1",
    )
    tiny.add_argument(
        "family",
        help="the family whose twin to build (docs/families.md lists the twins)",
    )
    tiny.add_argument("out_dir", type=Path, help="the folder to write")
    tiny.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")


def run_make_tiny(ns, overrides: list[str]) -> int:
    from automodel.twins import make_tiny

    print(make_tiny(ns.family, ns.out_dir, seed=ns.seed))
    return 0
