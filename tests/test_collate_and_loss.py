"""Answer-only labels, the vision-token budget, and our loss against the model's own."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from automodel.datasets.collate import default_collate_fn, has_rows, image_token_ids
from automodel.datasets.vlm import make_cord_v2_dataset
from automodel.loss import MaskedCrossEntropy
from automodel.models.forward import label_logits
from tests.conftest import labelled_spans


@pytest.fixture(scope="module")
def processor(tiny_gemma3):
    return AutoProcessor.from_pretrained(tiny_gemma3)


@pytest.fixture(scope="module")
def model(tiny_gemma3):
    return AutoModelForImageTextToText.from_pretrained(tiny_gemma3).train()


def _image(color=(200, 30, 30)):
    return Image.new("RGB", (64, 48), color)


def _turn(role, *parts):
    content = []
    for p in parts:
        content.append(
            {"type": "image", "image": p}
            if isinstance(p, Image.Image)
            else {"type": "text", "text": p}
        )
    return {"role": role, "content": content}


def test_labels_are_exactly_the_assistant_replies(processor):
    conversations = [
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            _turn("user", _image(), "What colour?"),
            _turn("assistant", "Red, mostly."),
            _turn("user", "And the total?"),
            _turn("assistant", '{"total": "9,000"}'),
        ],
        [_turn("user", _image((0, 0, 255)), "Colour?"), _turn("assistant", "Blue")],
    ]
    batch = default_collate_fn([{"conversation": c} for c in conversations], processor)
    tok = processor.tokenizer
    assert labelled_spans(batch["labels"][0], tok) == [
        "Red, mostly.<end_of_turn>",
        '{"total": "9,000"}<end_of_turn>',
    ]
    assert labelled_spans(batch["labels"][1], tok) == ["Blue<end_of_turn>"]
    ids = torch.tensor(image_token_ids(processor))
    labelled = batch["labels"] != -100
    assert not torch.isin(batch["input_ids"], ids)[labelled].any()
    assert not labelled[batch["attention_mask"] == 0].any(), "padding carries no label"
    assert batch["dropped"] == []


def test_cord_samples_label_only_the_target(processor, receipts):
    dataset = make_cord_v2_dataset(str(receipts), split="validation")
    batch = default_collate_fn([dataset[0], dataset[1]], processor)
    for row in range(2):
        target = dataset[row]["conversation"][-1]["content"][0]["text"]
        assert labelled_spans(batch["labels"][row], processor.tokenizer) == [
            target + "<end_of_turn>"
        ]


def test_max_length_never_cuts_image_tokens(processor):
    long_prompt = " ".join(["word"] * 200)
    examples = [
        {
            "id": "short",
            "conversation": [_turn("user", _image(), "Hi"), _turn("assistant", "Hello there")],
        },
        # Image after a long prompt: truncation would cut its image tokens, so it is dropped.
        {
            "id": "late-image",
            "conversation": [_turn("user", long_prompt, _image()), _turn("assistant", "x")],
        },
        # Reply beyond max_length: no label would survive, so it is dropped.
        {
            "id": "late-reply",
            "conversation": [_turn("user", _image(), long_prompt), _turn("assistant", "y")],
        },
        {"id": "no-reply", "conversation": [_turn("user", _image(), "Hi")]},
    ]
    batch = default_collate_fn(examples, processor, max_length=64)
    assert batch["input_ids"].shape == (1, batch["input_ids"].shape[1])
    assert batch["input_ids"].shape[1] <= 64
    reasons = dict(batch["dropped"])
    assert set(reasons) == {"late-image", "late-reply", "no-reply"}
    assert "image tokens" in reasons["late-image"]
    assert "no reply token" in reasons["late-reply"]
    assert "no assistant reply" in reasons["no-reply"]
    # The kept sample's image tokens all survive: as many as the processor makes per image.
    n_image = int((batch["input_ids"] == processor.tokenizer.image_token_id).sum())
    assert n_image == processor.image_seq_length
    # A batch that loses every sample has no rows but still names them.
    empty = default_collate_fn(examples[3:], processor)
    assert not has_rows(empty) and [name for name, _ in empty["dropped"]] == ["no-reply"]


def test_truncation_keeps_image_and_some_reply(processor):
    reply = " ".join(["seven"] * 100)
    example = {"conversation": [_turn("user", _image(), "Count"), _turn("assistant", reply)]}
    full = default_collate_fn([example], processor)
    cut = default_collate_fn([example], processor, max_length=48)
    assert full["input_ids"].shape[1] > 48 and cut["input_ids"].shape[1] == 48
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :48])
    assert (cut["labels"] != -100).any() and cut["dropped"] == []


def test_our_loss_equals_the_models_own_loss(model, processor, receipts):
    dataset = make_cord_v2_dataset(str(receipts), split="train")
    batch = default_collate_fn([dataset[i] for i in range(3)], processor)
    batch.pop("dropped")
    labels = batch.pop("labels")
    with torch.no_grad():
        reference = model(**batch, labels=labels).loss
        logits, targets = label_logits(model, batch, labels)
        ours = MaskedCrossEntropy()(logits, targets)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours, reference)


def test_token_weighted_accumulation_matches_one_big_batch(model, processor, receipts):
    """Two micro-batches divided by the step's token count give the big batch's loss."""
    dataset = make_cord_v2_dataset(str(receipts), split="train")
    samples = [dataset[i] for i in range(4)]
    loss_fn = MaskedCrossEntropy()

    def parts(examples):
        batch = default_collate_fn(examples, processor)
        batch.pop("dropped")
        labels = batch.pop("labels")
        return label_logits(model, batch, labels)

    with torch.no_grad():
        whole = loss_fn(*parts(samples))
        micro = [parts(samples[:1]), parts(samples[1:])]
        total_tokens = sum(len(t) for _, t in micro)
        accumulated = sum(loss_fn(logits, t, total_tokens) for logits, t in micro)
    assert torch.allclose(accumulated, whole, atol=1e-5, rtol=0)
