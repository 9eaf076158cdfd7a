"""Turns conversation samples into a model batch with answer-only labels.

Labels come from the chat template itself: the template wraps every assistant reply and its
end-of-turn token in ``{% generation %}``, and ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` marks exactly those tokens. Everything else (system,
prompt, image and padding tokens) is ``-100``. There is no per-family string matching.

Over-length samples are never cut through their image tokens: a row longer than ``max_length``
is truncated only when all its image tokens and at least one label token survive; otherwise the
sample is dropped from the batch and the reason travels with the batch (``batch["dropped"]``) so
the training loop can log and count it.
"""

from __future__ import annotations

from typing import Any

import torch

from automodel.loss.masked_ce import IGNORE_INDEX

# Keys whose second dimension is the sequence: truncated together with input_ids.
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "assistant_masks", "labels")


def image_token_ids(processor) -> list[int]:
    """Ids of the tokens that stand for image features (never labelled, never truncated)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = []
    for attr in ("image_token_id", "boi_token_id", "eoi_token_id", "image_token_index"):
        value = getattr(processor, attr, None)
        if value is None:
            value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.append(value)
    return sorted(set(ids))


def render_batch(conversations: list[list[dict]], processor) -> dict[str, torch.Tensor]:
    """Applies the chat template to a list of conversations and builds labels."""
    batch = processor.apply_chat_template(
        conversations,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "right"},
        return_assistant_tokens_mask=True,
    )
    input_ids = batch["input_ids"]
    mask = batch.pop("assistant_masks")
    if not torch.is_tensor(mask):
        mask = torch.tensor(mask)
    labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    image_ids = torch.tensor(image_token_ids(processor), dtype=input_ids.dtype)
    labels[torch.isin(input_ids, image_ids)] = IGNORE_INDEX
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    batch["labels"] = labels
    return dict(batch)


def _problem(row: int, batch: dict, image_ids: torch.Tensor, max_length: int | None) -> str | None:
    labels = batch["labels"][row]
    length = int(batch["attention_mask"][row].sum())
    if max_length is not None and length > max_length:
        image_pos = torch.isin(batch["input_ids"][row], image_ids).nonzero()
        if len(image_pos) and int(image_pos.max()) >= max_length:
            return (
                f"{length} tokens with image tokens up to position {int(image_pos.max())} "
                f"exceed max_length={max_length}"
            )
        labels = labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        if max_length is not None and length > max_length:
            return f"no reply token left within max_length={max_length} ({length} tokens)"
        return "the sample has no assistant reply to learn from"
    return None


def default_collate_fn(
    examples: list[dict[str, Any]], processor, max_length: int | None = None
) -> dict[str, Any] | None:
    """Collates conversation samples into one padded batch.

    Args:
        examples: samples of the form ``{"conversation": [...]}`` (see the dataset builders).
        processor: the model's Hugging Face processor, with a chat template that marks
            assistant replies with ``{% generation %}``.
        max_length: the longest sequence kept; ``None`` keeps everything.

    Returns:
        The processor's tensors plus ``labels`` and ``dropped`` (a list of ``(index, reason)``
        for samples left out), or ``None`` when no sample in the batch is usable.
    """
    image_ids = torch.tensor(image_token_ids(processor))
    keep = list(range(len(examples)))
    dropped: list[tuple[int, str]] = []
    while keep:
        batch = render_batch([examples[i]["conversation"] for i in keep], processor)
        problems = [(keep[r], _problem(r, batch, image_ids, max_length)) for r in range(len(keep))]
        bad = [(i, why) for i, why in problems if why is not None]
        if not bad:
            break
        # Re-render without the bad samples: per-family image tensors (tiles, grids) are laid
        # out by the processor, so removing rows by hand would be family-specific.
        dropped.extend(bad)
        bad_ids = {i for i, _ in bad}
        keep = [i for i in keep if i not in bad_ids]
    else:
        return None
    if max_length is not None and batch["input_ids"].shape[1] > max_length:
        for key in _SEQUENCE_KEYS:
            if key in batch and torch.is_tensor(batch[key]) and batch[key].dim() >= 2:
                batch[key] = batch[key][:, :max_length]
    batch["dropped"] = [(_sample_name(examples[i], i), why) for i, why in dropped]
    return batch


def _sample_name(example: dict, index: int) -> str:
    return str(example.get("id", example.get("_source", f"batch item {index}")))
