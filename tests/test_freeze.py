"""freeze_config for every family: each key freezes its part and only it, frozen parameters do
not move while the rest learns, and a frozen vision tower records no autograd graph."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from automodel.config.sections import FreezeConfig
from automodel.datasets.collate import default_collate_fn
from automodel.errors import UsageError
from automodel.loss import MaskedCrossEntropy
from automodel.models.forward import label_logits
from automodel.models.freeze import (
    apply_freeze,
    count_parameters,
    language_modules,
    projector_modules,
    vision_modules,
)
from automodel.twins import TWIN_FAMILIES as FAMILIES

ROLES = {
    "freeze_vision_tower": vision_modules,
    "freeze_projector": projector_modules,
    "freeze_language_model": language_modules,
    "freeze_embeddings": lambda model: [model.get_input_embeddings()],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches(tiny_family):
    cache = {}

    def get(family: str) -> dict:
        if family not in cache:
            processor = AutoProcessor.from_pretrained(tiny_family(family))
            conversation = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": Image.new("RGB", (90, 60), (200, 30, 30))},
                        {"type": "text", "text": "What colour?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Red, mostly."}]},
            ]
            batch = default_collate_fn([{"conversation": conversation}] * 2, processor)
            batch.pop("dropped"), batch.pop("resized")
            cache[family] = batch
        return cache[family]

    return get


def _params(modules: list[nn.Module]) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def _steps(model: nn.Module, batch: dict, steps: int = 2) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        inputs = dict(batch)
        labels = inputs.pop("labels")
        logits, targets = label_logits(model, inputs, labels)
        MaskedCrossEntropy()(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("key", list(ROLES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_key_freezes_its_part_and_the_rest_learns(family, key, tiny_family, batches):
    model = AutoModelForImageTextToText.from_pretrained(tiny_family(family))
    apply_freeze(model, FreezeConfig(**{k: k == key for k in ROLES}))
    frozen = _params(ROLES[key](model))
    assert frozen, f"{key} found nothing to freeze in {family}"
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) not in frozen), name
    trainable, total = count_parameters(model)
    assert 0 < trainable < total

    before = {id(p): p.detach().clone() for p in model.parameters()}
    _steps(model, batches(family))
    moved = {id(p) for p in model.parameters() if not torch.equal(before[id(p)], p)}
    assert not moved & frozen, f"{key}: frozen parameters changed"
    # Every other role keeps learning (a few of its tensors may get no gradient by design, such
    # as the unused last CLIP layer of LLaVA 1.5, so the check is per role, not per tensor).
    for other, modules in ROLES.items():
        rest = _params(modules(model)) - frozen
        if rest:
            assert rest & moved, f"with {key}, nothing of {other} changed"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_frozen_tower_builds_no_autograd_graph(family, tiny_family, batches):
    model = AutoModelForImageTextToText.from_pretrained(tiny_family(family)).train()
    outputs: list[torch.Tensor] = []

    def keep(module, args, output):
        tensors = (
            output if isinstance(output, tuple) else (getattr(output, "last_hidden_state", output),)
        )
        outputs.extend(t for t in tensors if torch.is_tensor(t))

    for module in vision_modules(model):
        module.register_forward_hook(keep)
    inputs = dict(batches(family))
    labels = inputs.pop("labels")

    apply_freeze(model)  # the default: the tower only
    logits, targets = label_logits(model, inputs, labels)
    assert outputs and all(t.grad_fn is None and not t.requires_grad for t in outputs)
    MaskedCrossEntropy()(logits, targets).backward()  # the projector still gets its gradient
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for m in projector_modules(model)
        for p in m.parameters()
    )

    # The same check fails for a trainable tower: the hook does see the graph.
    outputs.clear()
    for module in vision_modules(model):
        module.requires_grad_(True)
    label_logits(model, inputs, labels)
    assert any(t.grad_fn is not None for t in outputs)


def test_freezing_a_part_the_model_lacks_is_an_error():
    class TextOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.language_model = nn.Linear(2, 2)

    with pytest.raises(UsageError, match="freeze_config.freeze_vision_tower"):
        apply_freeze(TextOnly())
