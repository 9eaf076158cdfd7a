"""The optional image-text alignment loss: off by default (nothing hooked, loss unchanged), an
honest number when weighted, and logged beside the language-model loss by the recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from automodel.cli import main as cli_main
from automodel.datasets.collate import default_collate_fn
from automodel.loss import MaskedCrossEntropy
from automodel.loss.alignment import ImageTextAlignmentLoss
from automodel.models.families import image_token_id
from automodel.models.forward import label_logits
from automodel.models.freeze import apply_freeze, language_modules, projector_modules
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(processor, n: int) -> dict:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    examples = [
        {
            "conversation": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": Image.new("RGB", (64, 64), colours[i])},
                        {"type": "text", "text": "Colour?"},
                    ],
                },
                {"role": "assistant", "content": ["Red", "Green", "Blue"][i]},
            ]
        }
        for i in range(n)
    ]
    batch = default_collate_fn(examples, processor)
    batch.pop("dropped"), batch.pop("resized")
    return batch


def _loss(model, criterion, batch):
    inputs = dict(batch)
    labels = inputs.pop("labels")
    logits, targets = label_logits(model, inputs, labels)
    n = len(targets)
    lm = MaskedCrossEntropy()(logits, targets, n)
    return lm, criterion(lm, inputs, labels, n)


def _criterion(model, **kwargs) -> ImageTextAlignmentLoss:
    criterion = ImageTextAlignmentLoss(**kwargs)
    criterion.attach(language_modules(model)[0], image_token_id(model))
    return criterion


def test_weight_zero_changes_nothing(tiny_family):
    model = AutoModelForImageTextToText.from_pretrained(tiny_family("llava"))
    criterion = _criterion(model)
    assert not language_modules(model)[0]._forward_pre_hooks
    lm, total = _loss(
        model, criterion, _batch(AutoProcessor.from_pretrained(tiny_family("llava")), 3)
    )
    assert total is lm and criterion.metrics() == {}


def test_weighted_alignment_trains_the_projector_only(tiny_family):
    path = tiny_family("llava")
    model = AutoModelForImageTextToText.from_pretrained(path).train()
    apply_freeze(model)
    criterion = _criterion(model, weight=0.5)
    batch = _batch(AutoProcessor.from_pretrained(path), 3)
    lm, total = _loss(model, criterion, batch)
    metrics = criterion.metrics()
    assert set(metrics) == {"language_loss", "vision_loss"}
    assert metrics["language_loss"] == pytest.approx(lm.item(), abs=1e-6)
    assert total.item() == pytest.approx(lm.item() + 0.5 * metrics["vision_loss"], abs=1e-5)
    # Cosine logits lie within +-1/temperature, which bounds a 3-way InfoNCE.
    assert 0 < metrics["vision_loss"] < 2 / 0.07 + math.log(3)

    (total - lm).backward()  # the alignment part alone
    projector_grad = sum(
        p.grad.abs().sum() for m in projector_modules(model) for p in m.parameters()
    )
    assert projector_grad > 0
    embeddings = model.get_input_embeddings().weight
    assert embeddings.grad is None or not embeddings.grad.any(), "the text side is detached"


def test_no_negatives_no_number(tiny_family):
    path = tiny_family("llava")
    model = AutoModelForImageTextToText.from_pretrained(path).train()
    criterion = _criterion(model, weight=1.0)
    lm, total = _loss(model, criterion, _batch(AutoProcessor.from_pretrained(path), 1))
    assert total is lm and set(criterion.metrics()) == {"language_loss"}
    with torch.no_grad():  # validation: never weighted, never recorded
        lm, total = _loss(model, criterion, _batch(AutoProcessor.from_pretrained(path), 3))
    assert total is lm and criterion.metrics() == {}


def test_the_run_logs_vision_loss_beside_language_loss(tiny_family, receipts, tmp_path, capsys):
    code = cli_main(
        [
            "finetune",
            "vlm",
            "-c",
            str(ROOT / "examples/vlm/llava_1_5_7b_cord_v2.yaml"),
            f"--model.pretrained_model_name_or_path={tiny_family('llava')}",
            "--model.torch_dtype=float32",
            f"--dataset.path_or_dataset={receipts}",
            "~validation_dataset",
            "--step_scheduler.max_steps=2",
            "--step_scheduler.global_batch_size=4",
            "--step_scheduler.local_batch_size=4",
            "--dataloader.num_workers=0",
            "--vision_loss.weight=0.25",
            f"--checkpoint.checkpoint_dir={tmp_path}",
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    records = [json.loads(x) for x in (tmp_path / "training.jsonl").read_text().splitlines()]
    for r in records:
        assert r["loss"] == pytest.approx(r["language_loss"] + 0.25 * r["vision_loss"], abs=1e-5)
