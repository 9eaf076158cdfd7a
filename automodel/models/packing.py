"""Padding-free packing (config section ``packing``): a micro-batch's samples laid end to end.

The collate pads every sample of a micro-batch to the longest one. With packing on, the training
forward drops that padding: the samples are placed one after another, in order, in rows of at
most ``pack_length`` tokens (by default the micro-batch's longest sample), so the decoder runs
on fewer padding tokens. The samples stay apart:

- position ids restart at every sample. Families with multimodal RoPE (Qwen2-VL, Qwen2.5-VL)
  carry over the positions their own position-id method (the family registry's ``rope_index``)
  gives the unpacked batch.
- the attention mask lets a token see its own sample only: causal, plus the family's
  bidirectional spans (Gemma 3's image blocks, PaliGemma's prefix), within the sliding window
  on sliding-window layers. transformers' own mask builders make it, so every attention
  implementation gets the format it expects.
- labels move with their tokens. A sample's first token never carries a label (it is the prompt),
  so no token learns to predict the start of the next sample.

Image tensors are left as they are: the samples keep their order, so image placeholders meet
their features in the same order as unpacked.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from automodel.common import IGNORE_INDEX, SEQUENCE_KEYS, unwrap
from automodel.errors import UsageError
from automodel.models.families import family_of, rope_index

_LAYER_TYPES = {"full_attention", "sliding_attention"}


def pack_rows(lengths: list[int], pack_length: int | None) -> list[list[int]]:
    """Samples, in order, into rows of at most ``pack_length`` tokens (one row when None).

    A sample longer than ``pack_length`` gets a row of its own.
    """
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not rows or (pack_length is not None and used + n > pack_length):
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


class Packer:
    """Turns a right-padded micro-batch into packed rows (see the module docstring).

    Args:
        model: the VLM (or its PEFT wrapper).
        pack_length: the most tokens in one row; ``None``: as many as the micro-batch's longest
            sample, so a packed row is never longer than a padded one.

    Raises:
        UsageError: the model has attention layers packing does not handle, or its decoder mixes
            tokens outside attention (the family registry's ``packable``).
    """

    def __init__(self, model, pack_length: int | None = None):
        inner = unwrap(model)
        self.base = inner.model
        family = family_of(inner)
        self.family = inner.config.model_type
        self.text_config = inner.config.get_text_config()
        if not family.packable:
            raise UsageError(
                f"packing: {self.family}'s decoder mixes neighbouring tokens outside attention "
                "(short convolutions), so packed samples would see each other; set "
                "packing.enabled=false"
            )
        layer_types = set(getattr(self.text_config, "layer_types", None) or ["full_attention"])
        if layer_types - _LAYER_TYPES:
            raise UsageError(
                f"packing: {self.family} has {', '.join(sorted(layer_types - _LAYER_TYPES))} "
                "layers, which packed masks do not cover; set packing.enabled=false"
            )
        if pack_length is not None and pack_length < 1:
            raise UsageError(f"packing.pack_length={pack_length} must be at least 1 (or null)")
        self.sliding = "sliding_attention" in layer_types
        self.pack_length = pack_length
        # What the family registry says: which spans attend both ways (from token_type_ids), the
        # first position id, whether the forward takes one mask only, and for multimodal RoPE
        # families the model's own position-id method and its inputs.
        self.bidirectional = family.bidirectional
        self.first_position = family.first_position
        self.one_mask_only = family.one_mask_only
        self.pad_id = getattr(self.text_config, "pad_token_id", None) or 0
        self.rope_index, rope_inputs = rope_index(inner)
        self.rope_inputs = set(rope_inputs)

    def __call__(self, batch: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The packed model inputs and labels (``batch`` itself is left unchanged)."""
        real = batch["attention_mask"].bool()
        width = real.shape[1]
        lengths = real.sum(1)
        left_padded = (real != (torch.arange(width, device=real.device) < lengths[:, None])).any()
        first_labelled = (labels[:, 0] != IGNORE_INDEX).any()
        # The layout is decided on the host: one copy for everything it needs.
        host = torch.cat([lengths, torch.stack([left_padded, first_labelled]).long()]).tolist()
        lengths, (left_padded, first_labelled) = host[:-2], host[-2:]
        if left_padded:
            raise UsageError("packing needs right-padded batches (real tokens first in each row)")
        if first_labelled:
            raise UsageError("packing: a sample's first token carries a label")
        per_layer_type = self.sliding and max(lengths) > self.text_config.sliding_window
        if per_layer_type and self.one_mask_only:
            return batch, labels  # this family cannot take a separate sliding-window mask
        rows = pack_rows(lengths, self.pack_length or max(lengths))
        source, seq_ids, steps = (t.to(real.device) for t in _layout(rows, lengths, width))

        packed = {k: v for k, v in batch.items() if k not in SEQUENCE_KEYS}
        for key in SEQUENCE_KEYS:
            value = batch.get(key)
            if key in ("attention_mask", "labels") or not torch.is_tensor(value):
                continue
            packed[key] = _gather(value, source, self.pad_id if key == "input_ids" else 0)
        packed["attention_mask"] = self.masks(packed, seq_ids, steps, per_layer_type)
        packed["position_ids"] = self.positions(batch, source, steps)
        return packed, _gather(labels, source, IGNORE_INDEX)

    def positions(self, batch: dict, source: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The packed rows' position ids: ``steps`` (each sample's token index) in the family's
        convention. Multimodal RoPE families get ``[4, R, L]``: ``steps``, then the three
        position rows their ``rope_index`` method gives the unpacked batch."""
        if self.rope_index is not None and "mm_token_type_ids" in batch:
            inputs = {
                k: v for k, v in batch.items() if k in self.rope_inputs and torch.is_tensor(v)
            }
            rope = _gather(self.rope_index(**inputs)[0], source, 0)
            return torch.cat([steps[None], rope])
        return steps + self.first_position

    def masks(self, packed: dict, seq_ids: torch.Tensor, steps: torch.Tensor, per_layer_type: bool):
        """The decoder's attention mask for the packed rows.

        transformers builds it: given position ids that restart at every sample and no 2D
        mask, its builders keep each sample to itself (and the padding at a row's end to
        itself). One mask serves every layer unless a sample is longer than the sliding window:
        then sliding-window layers get their own (``{"full_attention": ..., ...}``).
        """
        embeds = torch.empty(
            (*seq_ids.shape, 1), dtype=next(self.base.parameters()).dtype, device=seq_ids.device
        )
        common = {
            "config": self.text_config,
            "inputs_embeds": embeds,
            "attention_mask": None,
            "cache": None,
            "position_ids": steps,
            "block_sequence_ids": self.blocks(packed.get("token_type_ids"), seq_ids),
        }
        full = create_causal_mask(**common)
        if not per_layer_type:
            return full
        sliding = create_sliding_window_causal_mask(**common)
        return {"full_attention": full, "sliding_attention": sliding}

    def blocks(self, token_type_ids: torch.Tensor | None, seq_ids: torch.Tensor):
        """Ids of the spans attended both ways (-1 elsewhere), or None for a causal family."""
        if self.bidirectional is None or token_type_ids is None:
            return None
        if self.bidirectional == "prefix":
            return torch.where((token_type_ids == 0) & (seq_ids >= 0), seq_ids, -1)
        image = token_type_ids == 1
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, starts.long().cumsum(1) - 1, -1)


def _layout(rows: list[list[int]], lengths: list[int], width: int):
    """Per packed slot: its flat index in the padded batch (-1: padding), its sample (-1:
    padding) and its index within its sample (the padding at a row's end counts as one run)."""
    length = max(sum(lengths[i] for i in row) for row in rows)
    source = torch.full((len(rows), length), -1, dtype=torch.long)
    seq_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    steps = torch.empty((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            source[r, at : at + n] = torch.arange(i * width, i * width + n)
            seq_ids[r, at : at + n] = i
            steps[r, at : at + n] = torch.arange(n)
            at += n
        steps[r, at:] = torch.arange(length - at)
    return source, seq_ids, steps


def _gather(value: torch.Tensor, source: torch.Tensor, fill: int) -> torch.Tensor:
    """``value[..., B, T]`` laid out as ``source`` says (``[..., R, L]``); ``fill`` in padding."""
    flat = value.reshape(*value.shape[:-2], -1)
    out = flat[..., source.clamp(min=0)]
    return out.masked_fill(source < 0, fill)
