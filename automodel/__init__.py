"""automodel: fine-tune vision-language models from one YAML file."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["AutoModelForImageTextToText"]


def __getattr__(name: str):
    # Loaded on first use: ``import automodel`` (and the CLI's start) must not import torch.
    if name == "AutoModelForImageTextToText":
        from automodel.models.auto import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    raise AttributeError(f"module 'automodel' has no attribute {name!r}")
