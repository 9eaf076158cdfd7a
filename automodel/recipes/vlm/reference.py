"""Prints the fine-tuning recipe's config reference: ``python -m automodel.recipes.vlm.reference
> docs/config.md``."""

from __future__ import annotations

from automodel.config.reference import render
from automodel.recipes.vlm.config import SCHEMA

COMMAND = "python -m automodel.recipes.vlm.reference > docs/config.md"


def reference() -> str:
    return render(SCHEMA, COMMAND)


if __name__ == "__main__":
    print(reference(), end="")
