"""Padding-free packing: packed rows give every family the same hidden states as padded rows."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image
from transformers.masking_utils import create_causal_mask

from automodel.datasets.collate import default_collate_fn
from automodel.errors import UsageError
from automodel.loss.chunked import label_hidden
from automodel.models.families import family_of
from automodel.models.packing import Packer, pack_rows
from automodel.twins import TWIN_FAMILIES as FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pack_rows_keeps_order_and_limits():
    assert pack_rows([5, 3, 4, 9, 1], None) == [[0, 1, 2, 3, 4]]
    assert pack_rows([5, 3, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert pack_rows([5, 3, 4, 9, 1], 12) == [[0, 1, 2], [3, 4]]


def conversation(images: int, words: int, color: tuple[int, int, int]) -> dict:
    user = [{"type": "image", "image": Image.new("RGB", (40 + 8 * images, 32), color)}] * images
    user = [*user, {"type": "text", "text": "Read it please."}]
    reply = [{"type": "text", "text": " ".join(["latte tea cake"] * words)}]
    return {
        "conversation": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply},
        ]
    }


# Lengths differ, one sample has no image and one has two (families that refuse a sample drop it).
SAMPLES = [
    conversation(1, 2, (200, 10, 10)),
    conversation(0, 5, (0, 0, 0)),
    conversation(1, 9, (10, 200, 10)),
    conversation(2, 1, (10, 10, 200)),
]


def padded_batch(folder, samples):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    batch = default_collate_fn(samples, processor)
    labels = batch.pop("labels")
    return model, {k: v for k, v in batch.items() if torch.is_tensor(v)}, labels


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_packed_rows_match_padded_rows(family, tiny_family):
    model, batch, labels = padded_batch(tiny_family(family), SAMPLES)
    refusal = family_of(model).packing_refusal
    refused = refusal(model.config) if refusal else None
    if refused:
        # The registry says why this decoder cannot keep packed samples apart (Qwen3.5's linear
        # attention): packing is refused in one line, before any batch is packed.
        with pytest.raises(UsageError) as error:
            Packer(model)
        message = str(error.value)
        assert "\n" not in message and refused in message and "packing.enabled=false" in message
        return
    hidden, targets = label_hidden(model, batch, labels)
    lengths = batch["attention_mask"].sum(1).tolist()
    # One row; rows just long enough to pair the two shortest neighbours; the default (rows as
    # long as the longest sample).
    pair = min(a + b for a, b in itertools.pairwise(lengths))
    for pack_length in (10_000, pair, None):
        packed, packed_labels = Packer(model, pack_length)(batch, labels)
        rows, width = packed["input_ids"].shape
        if pack_length is None:
            assert width <= max(lengths)
        else:
            assert rows < len(lengths)  # some samples share a row
        if pack_length == 10_000:
            assert packed["input_ids"].numel() == sum(lengths)  # not one padding token
        packed_hidden, packed_targets = label_hidden(model, packed, packed_labels)
        assert torch.equal(packed_targets, targets)
        torch.testing.assert_close(packed_hidden, hidden, rtol=1e-4, atol=2e-5)

    # The same rows without isolation (plain causal attention, one position run) do differ.
    packed, packed_labels = Packer(model, 10_000)(batch, labels)
    positions = packed["position_ids"]
    packed["position_ids"] = torch.arange(positions.shape[-1]).expand_as(positions)
    packed["attention_mask"] = None
    leaky, _ = label_hidden(model, packed, packed_labels)
    assert (leaky - hidden).abs().max() > 1e-2


@torch.no_grad()
def test_a_sample_longer_than_the_sliding_window(tiny_family):
    long = conversation(1, 60, (5, 5, 5))  # beyond the twins' 128-token sliding window
    model, batch, labels = padded_batch(tiny_family("gemma3"), [long, *SAMPLES])
    assert batch["attention_mask"].sum(1).max() > model.config.text_config.sliding_window
    hidden, _ = label_hidden(model, batch, labels)
    packed, packed_labels = Packer(model)(batch, labels)
    assert set(packed["attention_mask"]) == {"full_attention", "sliding_attention"}
    packed_hidden, _ = label_hidden(model, packed, packed_labels)
    torch.testing.assert_close(packed_hidden, hidden, rtol=1e-4, atol=2e-5)

    # PaliGemma's forward takes a single mask: such a batch is left padded.
    model, batch, labels = padded_batch(tiny_family("paligemma"), [long, *SAMPLES])
    same, same_labels = Packer(model)(batch, labels)
    assert same is batch and same_labels is labels


@torch.no_grad()
def test_packing_refuses_a_decoder_whose_convolutions_cross_samples(tiny_family):
    """LFM2's short convolutions read the tokens just before each position: packed, a sample's
    first tokens would read the previous sample's last ones. The registry says so
    and packing refuses the family in one line."""
    model, batch, _ = padded_batch(tiny_family("lfm2_vl"), SAMPLES[:2])
    assert family_of(model).packing_refusal(model.config)
    with pytest.raises(
        UsageError, match=r"^packing: lfm2_vl's decoder mixes .*packing.enabled=false$"
    ):
        Packer(model)
    # Why: a text sample placed behind 5 other tokens, with positions restarting at it (which
    # keeps attention to itself, as packing does), no longer gives its own hidden states.
    ids = batch["input_ids"][1:, : int(batch["attention_mask"][1].sum())]
    alone = model.model.language_model(input_ids=ids).last_hidden_state
    embeds = model.get_input_embeddings()(torch.cat([batch["input_ids"][:1, :5], ids], 1))
    positions = torch.cat([torch.arange(5), torch.arange(ids.shape[1])])[None]
    own_sample_only = create_causal_mask(
        config=model.config.get_text_config(),
        inputs_embeds=embeds,
        attention_mask=None,
        cache=None,
        position_ids=positions,
    )
    behind = model.model.language_model(
        inputs_embeds=embeds, attention_mask=own_sample_only, position_ids=positions
    ).last_hidden_state[:, 5:]
    assert (behind - alone).abs().max() > 1e-3  # 0 to 1e-6 for an attention-only decoder


def test_packing_refuses_left_padding_and_bad_lengths(tiny_family):
    model, batch, labels = padded_batch(tiny_family("gemma3"), SAMPLES[:2])
    with pytest.raises(UsageError, match="pack_length"):
        Packer(model, 0)
    flipped = {k: v.flip(1) if v.dim() == 2 else v for k, v in batch.items()}
    with pytest.raises(UsageError, match="right-padded"):
        Packer(model)(flipped, labels.flip(1))


def test_gemma4_with_bidirectional_image_attention_is_refused(tmp_path):
    """Gemma 4's large checkpoints (use_bidirectional_attention="vision") attend image tokens
    both ways on sliding-window layers only; packing refuses them, E2B / E4B (causal) pack."""
    from transformers import AutoModelForImageTextToText

    from automodel.twins import make_tiny

    folder = make_tiny("gemma4", tmp_path / "g4", use_bidirectional_attention="vision")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    with pytest.raises(UsageError, match="use_bidirectional_attention='vision'.*packing.enabled"):
        Packer(model)
