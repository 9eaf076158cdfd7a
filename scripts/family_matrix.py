"""The per-family test matrix as a table, for docs/families.md.

For every tiny twin (``TWIN_FAMILIES``), or the families named on the command line, it builds
the twin, collates one fixed conversation (two exchanges, one 320x240 image in the first user
turn) and prints a Markdown row: the labelled tokens of the sample over its tokens, and its
image tokens (placeholders and the markers around them, as the collate counts them). A
prefix-LM (one user turn and one reply) gets the first exchange only, marked ``*``; a thinking
template's conversation becomes one row per reply (docs/datasets.md), and the counts sum them.

With ``--time`` it also runs each family's share of the matrix, ``pytest -q -k FAMILY`` over
the matrix test files, and adds its seconds and outcome; ``--slow`` adds the slow ones (exact
resume, 2-rank FSDP2 with a text-only rank) in a column of their own. Each pytest run pays its
own start-up and twin build (about 10 s here), which the seconds include.

    python scripts/family_matrix.py
    python scripts/family_matrix.py gemma3 llava --time
    python scripts/family_matrix.py --time --slow

The same-tokens reload check (``test_train_save_reload_and_generate_in_a_fresh_process``) runs
every family in one fresh process; it is not part of a family's ``-k`` selection.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MATRIX_TESTS = [
    "tests/test_families.py",  # labels under the real template, loss parity
    "tests/test_packing.py",  # packing equal to padding
    "tests/test_freeze.py",  # freezing
    "tests/test_peft.py",  # LoRA default targets
]
SLOW_TESTS = [
    "tests/test_resume.py",  # exact resume through the CLI
    "tests/test_distributed.py",  # 2-rank FSDP2 with a text-only rank
]


def conversation(prefix_lm: bool) -> list[dict]:
    """The fixed sample: a receipt-like image, two questions and their replies."""
    from PIL import Image

    image = Image.new("RGB", (320, 240), (235, 230, 220))
    turns = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "What is the total on this receipt?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The total is 9,000."}]},
        {"role": "user", "content": [{"type": "text", "text": "And how many items?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Three items."}]},
    ]
    return turns[:2] if prefix_lm else turns


def token_counts(family: str, folder: Path) -> tuple[str, str]:
    """``(labels/tokens, image tokens)`` of the fixed sample collated for ``family``'s twin."""
    import torch
    from transformers import AutoProcessor

    from automodel.datasets.collate import default_collate_fn, image_token_ids, is_prefix_lm
    from automodel.twins import make_tiny

    processor = AutoProcessor.from_pretrained(make_tiny(family, folder / family, seed=0))
    prefix_lm = is_prefix_lm(processor)
    batch = default_collate_fn([{"conversation": conversation(prefix_lm)}], processor)
    if batch is None or batch["dropped"]:
        reason = batch["dropped"][0][1] if batch else "no usable sample"
        return f"dropped: {reason}", "-"
    total = int(batch["attention_mask"].sum())
    labels = int((batch["labels"] != -100).sum())
    images = int(torch.isin(batch["input_ids"], torch.tensor(image_token_ids(processor))).sum())
    rows = batch["input_ids"].shape[0]
    note = " *" if prefix_lm else f" ({rows} rows)" if rows > 1 else ""
    return f"{labels}/{total}{note}", str(images)


def selection(family: str, families: list[str]) -> str:
    """A ``-k`` expression for ``family``'s tests alone (``llava`` without ``llava_siglip``)."""
    longer = [f for f in families if f != family and family in f]
    return " and ".join([family, *(f"not {f}" for f in longer)])


def run_tests(family: str, families: list[str], files: list[str], slow: bool) -> tuple[str, bool]:
    """Seconds and pytest's outcome for ``family``'s tests in ``files``; whether all passed."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-k", selection(family, families), *(["-m", "slow"] if slow else []), *files]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    lines = result.stdout.strip().splitlines()
    outcome = lines[-1].strip("= ") if lines else "no output"  # "14 passed, 109 deselected in 9s"
    outcome = re.sub(r"(, )?\d+ (deselected|warnings?)|\s*in [\d.]+s.*$", "", outcome).strip(", ")
    return f"{seconds:.0f} s ({outcome})", result.returncode == 0


def main(argv: list[str] | None = None) -> int:
    from automodel.twins import TWIN_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="families to report (default: every twin)")
    parser.add_argument("--time", action="store_true", help="run and time each family's tests")
    parser.add_argument("--slow", action="store_true", help="with --time: the slow tests too")
    args = parser.parse_args(argv)
    known = list(TWIN_FAMILIES)
    unknown = [f for f in args.families if f not in known]
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; known: {', '.join(known)}")

    suites = []  # (column, test files, slow)
    if args.time:
        suites.append(("matrix tests", MATRIX_TESTS, False))
        if args.slow:
            suites.append(("slow tests", SLOW_TESTS, True))
    header = ["family", "labels / tokens", "image tokens", *(column for column, _, _ in suites)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    all_passed = True
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families or known:
            row = [family, *token_counts(family, Path(tmp))]
            for _, files, slow in suites:
                cell, passed = run_tests(family, known, files, slow)
                row.append(cell)
                all_passed &= passed
            print("| " + " | ".join(row) + " |", flush=True)
    return 0 if all_passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
