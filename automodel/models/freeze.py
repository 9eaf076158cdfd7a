"""Freezing parts of a VLM by role: vision tower, projector, language model, embeddings.

Each family's parts are module paths in the family registry (``automodel.models.families``);
a model of an unregistered family has them found by attribute names. ``freeze_embeddings``
freezes the input embeddings; where the output projection is tied to them (Gemma 3, PaliGemma)
that freezes ``lm_head`` too, since it is the same tensor.
"""

from __future__ import annotations

from torch import nn

from automodel.config.sections import FreezeConfig
from automodel.errors import UsageError
from automodel.models.families import family_of, tower_parts, transformers_model


def projector_modules(model: nn.Module) -> list[nn.Module]:
    """The modules mapping vision features into the language model's embedding space."""
    inner = transformers_model(model)
    return [inner.get_submodule(path) for path in family_of(inner).projector]


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The vision tower's modules, without a projector nested inside it.

    Returns:
        Modules whose parameters all belong to the tower (for Qwen2-VL the children of the
        vision module other than the patch merger).
    """
    inner = transformers_model(model)
    return [module for _, module in tower_parts(inner, family_of(inner))]


def language_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder and its output projection."""
    inner = transformers_model(model)
    modules = [inner.get_submodule(path) for path in family_of(inner).decoder]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return modules + ([head] if head is not None else [])


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The input token embeddings."""
    inner = transformers_model(model)
    path = family_of(inner).embeddings
    return [inner.get_submodule(path) if path else model.get_input_embeddings()]


def _freeze(modules: list[nn.Module], key: str, model: nn.Module) -> None:
    if not modules:
        raise UsageError(
            f"freeze_config.{key}: {type(model).__name__} has no such part that automodel "
            f"recognises; set {key}: false"
        )
    for module in modules:
        module.requires_grad_(False)


def apply_freeze(model: nn.Module, config: FreezeConfig | None = None) -> None:
    """Sets ``requires_grad=False`` on the chosen parts of ``model`` (in place).

    Args:
        model: a transformers VLM (``*ForConditionalGeneration``).
        config: the ``freeze_config`` section (None: its defaults): ``freeze_vision_tower`` (the image encoder; the
            projector stays trainable), ``freeze_projector``, ``freeze_language_model`` (the
            decoder and ``lm_head``), ``freeze_embeddings`` (and ``lm_head`` when tied to them).

    The training loop keeps a frozen tower in eval mode (see ``vision_modules``), so dropout
    in it does not change its output between steps. A frozen tower fed pixel values that need
    no gradient records no autograd graph.

    Raises:
        UsageError: a part to freeze does not exist in this model.
    """
    config = config or FreezeConfig()
    if config.freeze_vision_tower:
        _freeze(vision_modules(model), "freeze_vision_tower", model)
    if config.freeze_projector:
        _freeze(projector_modules(model), "freeze_projector", model)
    if config.freeze_language_model:
        _freeze(language_modules(model), "freeze_language_model", model)
    if config.freeze_embeddings:
        _freeze(embedding_modules(model), "freeze_embeddings", model)


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
