"""Freezing parts of a VLM by role: vision tower, projector, language model, embeddings."""

from __future__ import annotations

from torch import nn

# Attribute names transformers VLMs use for each role, on ``model.model`` (transformers 5.x).
_VISION = ("vision_tower", "vision_model", "visual")
_PROJECTOR = ("multi_modal_projector", "connector", "mm_projector")
_LANGUAGE = ("language_model", "text_model")


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


def _find(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    inner = _inner(model)
    return [getattr(inner, n) for n in names if isinstance(getattr(inner, n, None), nn.Module)]


def vision_modules(model: nn.Module) -> list[nn.Module]:
    return _find(model, _VISION)


def apply_freeze(
    model: nn.Module,
    freeze_vision_tower: bool = True,
    freeze_projector: bool = False,
    freeze_language_model: bool = False,
    freeze_embeddings: bool = False,
) -> None:
    """Sets ``requires_grad=False`` on the chosen parts of ``model`` (in place).

    Frozen modules are also put in eval mode by the caller's ``train()`` handling, so dropout
    in a frozen tower does not change its output between steps.
    """
    groups = []
    if freeze_vision_tower:
        groups += _find(model, _VISION)
    if freeze_projector:
        groups += _find(model, _PROJECTOR)
    if freeze_language_model:
        groups += _find(model, _LANGUAGE)
        groups.append(model.get_output_embeddings())
    if freeze_embeddings:
        groups.append(model.get_input_embeddings())
    for module in groups:
        if module is not None:
            module.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns (trainable, total) parameter counts, tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
