"""``automodel export merge-lora --base B --adapter A --out O``."""

from __future__ import annotations

from pathlib import Path

from automodel.cli.common import command


def add_parsers(sub, parents) -> None:
    export = sub.add_parser(
        "export",
        help="export utilities (merge-lora)",
        description="Export utilities.",
        epilog="example:\n  automodel export merge-lora --base google/gemma-3-4b-it "
        "--adapter ckpt/final_adapter --out merged",
    )
    actions = export.add_subparsers(dest="action", required=True, metavar="ACTION")
    merge = command(
        actions,
        "merge-lora",
        run_merge_lora,
        help="merge a LoRA adapter into its base model",
        description="Load a base model, apply a PEFT LoRA adapter, merge it into the weights and "
        "write an\nordinary Hugging Face folder with the processor and chat template.",
        epilog="example:\n  automodel export merge-lora --base google/gemma-3-4b-it "
        "--adapter ckpt/final_adapter --out merged",
    )
    merge.add_argument("--base", required=True, help="base model folder or hub id")
    merge.add_argument("--adapter", required=True, type=Path, help="PEFT adapter folder")
    merge.add_argument("--out", required=True, type=Path, help="where to write the merged model")
    merge.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own Python code (auto_map in its config); only for "
        "folders you trust",
    )


def run_merge_lora(ns, overrides: list[str]) -> int:
    from automodel.recipes.vlm.export import merge_lora

    print(merge_lora(ns.base, ns.adapter, ns.out, trust_remote_code=ns.trust_remote_code))
    return 0
