"""Freezing parts of a VLM by role: vision tower, projector, language model, embeddings.

Roles are found by the attribute names transformers 5.x gives them on ``model.model``:

| role | Gemma 3, PaliGemma, LLaVA | Qwen2-VL, Qwen2.5-VL | SmolVLM, Idefics3 |
|---|---|---|---|
| vision tower | ``vision_tower`` | ``visual`` (without ``merger``) | ``vision_model`` |
| projector | ``multi_modal_projector`` | ``visual.merger`` | ``connector`` |
| language model | ``language_model`` + ``lm_head`` | ``language_model`` + ``lm_head`` | ``text_model`` + ``lm_head`` |

``freeze_embeddings`` freezes the input embeddings; where the output projection is tied to them
(Gemma 3, PaliGemma) that freezes ``lm_head`` too, since it is the same tensor.
"""

from __future__ import annotations

from torch import nn

from automodel.config.sections import FreezeConfig
from automodel.errors import UsageError

_VISION = ("vision_tower", "vision_model", "visual")
_PROJECTOR = ("multi_modal_projector", "connector", "mm_projector", "merger")
_LANGUAGE = ("language_model", "text_model")


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


def _children(module: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    return [getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Module)]


def projector_modules(model: nn.Module) -> list[nn.Module]:
    """The modules mapping vision features into the language model's embedding space."""
    inner = _inner(model)
    found = _children(inner, _PROJECTOR)
    # Qwen2-VL keeps its projector (the patch merger) inside the vision module.
    for tower in _children(inner, _VISION):
        found += _children(tower, _PROJECTOR)
    return found


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The vision tower's modules, without a projector nested inside it.

    Returns:
        Modules whose parameters all belong to the tower (for Qwen2-VL the children of
        ``visual`` other than ``merger``).
    """
    projector_ids = {id(m) for m in projector_modules(model)}
    towers = []
    for tower in _children(_inner(model), _VISION):
        if any(id(child) in projector_ids for child in tower.children()):
            towers += [c for c in tower.children() if id(c) not in projector_ids]
        else:
            towers.append(tower)
    return towers


def language_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder and its output projection."""
    modules = _children(_inner(model), _LANGUAGE)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return modules + ([head] if head is not None else [])


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
        _freeze([model.get_input_embeddings()], "freeze_embeddings", model)


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
