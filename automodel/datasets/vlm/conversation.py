"""Conversation datasets: OpenAI-style content parts, LLaVA and ShareGPT, detected per record.

Accepted records (one per JSONL line, or an array in a ``.json`` file, or rows of any dataset
``open_records`` reads):

- OpenAI / Hugging Face content parts::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

  Image parts may be ``{"type": "image_url", "image_url": {"url": "a.png"}}`` (``data:`` URLs
  too), or a bare ``{"type": "image"}`` that takes the next entry of the record's ``images``.
  ``content`` may also be a plain string. ``conversation`` works as the key too.

- LLaVA / ShareGPT::

    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                         {"from": "gpt", "value": "A cat."}]}

  ``image`` may be a list, or ``images``; each ``<image>`` placeholder takes the next one. With
  no placeholder at all, the images go before the first user text.

Roles ``human``/``user`` -> user, ``gpt``/``assistant``/``model`` -> assistant, ``system``.
Several turns and several images per sample work; every assistant turn is learned. An assistant
turn may carry its reasoning as a ``reasoning``, ``thinking`` or ``reasoning_content`` string:
it is kept as ``reasoning`` and learned inside the chat template's think block.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

from automodel.datasets.vlm.base import (
    ConversationDataset,
    check_image_size,
    image_part,
    select_indices,
    set_image_root,
    text_part,
)
from automodel.datasets.vlm.sources import BadSampleError, open_records

IMAGE_PLACEHOLDER = "<image>"
TURN_KEYS = ("messages", "conversation", "conversations")
ROLE_NAMES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


class ConversationFileDataset(ConversationDataset):
    """Records holding whole conversations (OpenAI content parts, LLaVA or ShareGPT)."""

    what = "conversation dataset"

    def to_conversation(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        key = next((k for k in TURN_KEYS if k in record), None)
        if key is None:
            raise BadSampleError(
                f"no 'messages', 'conversation' or 'conversations' field; the record has: "
                f"{', '.join(map(str, record)) or 'nothing'}"
            )
        turns = record[key]
        if not isinstance(turns, list) or not turns:
            raise BadSampleError(f"{key!r} is not a non-empty list of turns")
        pending = _record_images(record)
        state = {"next": 0, "placeholders": 0}
        conversation = []
        for number, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                raise BadSampleError(f"turn {number} is not an object")
            raw_role = turn.get("role", turn.get("from"))
            role = ROLE_NAMES.get(str(raw_role).lower()) if raw_role is not None else None
            if role is None:
                raise BadSampleError(
                    f"turn {number} has role {raw_role!r}; use one of {', '.join(ROLE_NAMES)}"
                )
            content = turn.get("content", turn.get("value"))
            parts = self._parts(content, pending, state, number)
            conversation.append({"role": role, "content": parts, **_reasoning(turn, role, number)})
        used = state["next"]
        if used < len(pending):
            if state["placeholders"]:
                raise BadSampleError(
                    f"{len(pending)} images but {state['placeholders']} {IMAGE_PLACEHOLDER} "
                    "placeholders"
                )
            # No placeholder at all (common in LLaVA-style data): images open the first user turn.
            first_user = next((t for t in conversation if t["role"] == "user"), None)
            if first_user is None:
                raise BadSampleError("the sample has images but no user turn")
            first_user["content"] = [image_part(self.image_ref(v)) for v in pending] + first_user[
                "content"
            ]
        return conversation

    def _parts(
        self, content: Any, pending: list[Any], state: dict[str, int], number: int
    ) -> list[dict[str, Any]]:
        def next_image() -> dict[str, Any]:
            state["placeholders"] += 1
            if state["next"] >= len(pending):
                raise BadSampleError(
                    f"turn {number}: more image placeholders than images ({len(pending)})"
                )
            state["next"] += 1
            return image_part(self.image_ref(pending[state["next"] - 1]))

        if content is None:
            return []
        if isinstance(content, str):
            parts: list[dict[str, Any]] = []
            for k, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if k:
                    parts.append(next_image())
                if piece.strip():
                    parts.append(text_part(piece.strip()))
            return parts
        if not isinstance(content, list):
            raise BadSampleError(f"turn {number}: content is neither a string nor a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(text_part(str(part.get("text") or "")))
            elif kind in ("image", "image_url"):
                value = part.get(kind)
                if kind == "image" and value is None:
                    value = part.get("path", part.get("url"))
                if isinstance(value, dict) and "url" in value:
                    value = value["url"]
                parts.append(
                    image_part(self.image_ref(value)) if value is not None else next_image()
                )
            else:
                raise BadSampleError(f"turn {number}: unknown content part {part!r:.80}")
        return parts


def _record_images(record: dict[str, Any]) -> list[Any]:
    value = record.get("images", record.get("image"))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def make_conversation_dataset(
    path_or_dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict,
    split: str = "train",
    image_size: int | None = None,
    limit: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    image_root: str | os.PathLike[str] | None = None,
) -> ConversationFileDataset:
    """Conversations in OpenAI content-part, LLaVA or ShareGPT form (detected per record).

    Args:
        path_or_dataset: a ``.jsonl`` file, a ``.json`` array (LLaVA), a folder with
            ``<split>.jsonl``, or any source ``make_hf_dataset`` reads.
        split: ``train``; ``validation`` with ``val_fraction``, or in a folder that has it.
        image_size: when set, images are resized to fit within ``image_size`` pixels.
        limit: keep only the first ``limit`` samples.
        val_fraction: hold out this seeded share of the records; ``split`` picks the side.
        seed: the hold-out permutation's seed.
        image_root: resolve relative image paths against this folder instead of the data
            file's (e.g. LLaVA's JSON from the hub with a local COCO folder).

    Returns:
        A map-style dataset that decodes images in ``__getitem__``.
    """
    what = ConversationFileDataset.what
    check_image_size(image_size, what)
    source = open_records(path_or_dataset, split, what, holdout=val_fraction is not None)
    set_image_root(source, image_root)
    indices = select_indices(source, split, val_fraction, seed, limit, what)
    return ConversationFileDataset(source, indices, image_size)


# Where a record's assistant turn may carry its reasoning.
REASONING_FIELDS = ("reasoning", "thinking", "reasoning_content")


def _reasoning(turn: dict[str, Any], role: str, number: int) -> dict[str, str]:
    """``{"reasoning": text}`` for an assistant turn that carries reasoning, else ``{}``."""
    found = [turn[k] for k in REASONING_FIELDS if turn.get(k) is not None]
    if not found:
        return {}
    text = found[0]
    if role != "assistant" or not isinstance(text, str):
        raise BadSampleError(
            f"turn {number} ({role}) has reasoning that is not an assistant turn's string"
        )
    return {"reasoning": text} if text.strip() else {}
