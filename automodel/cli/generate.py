"""``automodel generate --model DIR (--image IMG|DIR | --jsonl PROMPTS.jsonl)``."""

from __future__ import annotations

from pathlib import Path

from automodel.cli.common import command, positive
from automodel.errors import UsageError


def add_parsers(sub, parents) -> None:
    parser = command(
        sub,
        "generate",
        run_generate,
        help="reply to images and prompts with a model",
        description="Reply to an image and a prompt with a model. With a folder of images or a "
        "JSONL of prompts,\nwrite one prediction per line to --out.",
        epilog="examples:\n"
        "  automodel generate --model checkpoints/final_model --image receipt.png "
        '--prompt "Read this receipt."\n'
        "  automodel generate --model checkpoints/final_model --jsonl prompts.jsonl "
        "--out pred.jsonl",
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
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default 256")
    parser.add_argument("--batch-size", default="8", metavar="N", help="default 8")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own Python code (auto_map in its config); only for "
        "folders you trust",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="the weights' dtype: auto (as saved, the default), bfloat16, float16 or float32",
    )


def run_generate(ns, overrides: list[str]) -> int:
    if (ns.image is None) == (ns.jsonl is None):
        raise UsageError("give one of --image (a file or a folder) and --jsonl")
    batch_size = positive("--batch-size", ns.batch_size)
    from automodel.common import parse_dtype
    from automodel.generation import (
        check_prompts,
        generate_reply,
        generate_to_jsonl,
        item_messages,
        read_generation_inputs,
    )
    from automodel.models.auto import load_for_inference, load_processor

    dtype = parse_dtype(ns.dtype, "--dtype", allow_auto=True)
    items = read_generation_inputs(ns.image, ns.jsonl, ns.prompt)
    trust = ns.trust_remote_code
    processor = load_processor(str(ns.model), trust_remote_code=trust)
    check_prompts(processor, items)  # before the model loads
    model = load_for_inference(str(ns.model), dtype, trust_remote_code=trust)
    if ns.jsonl is None and ns.image.is_file() and ns.out is None:
        print(generate_reply(model, processor, item_messages(items[0]), ns.max_new_tokens))
        return 0
    out = ns.out or Path("predictions.jsonl")
    out = generate_to_jsonl(model, processor, items, out, ns.max_new_tokens, batch_size)
    print(f"wrote {len(items)} predictions to {out}")
    return 0
