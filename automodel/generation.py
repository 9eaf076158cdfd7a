"""Greedy generation from a conversation, shared by the CLI and the training preview."""

from __future__ import annotations

import torch


def prompt_messages(conversation: list[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
    return conversation if last is None else conversation[:last]


def reply_text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


@torch.no_grad()
def generate_reply(model, processor, messages: list[dict], max_new_tokens: int = 128) -> str:
    """Generates the assistant's next reply to ``messages`` (greedy).

    Args:
        model: a transformers VLM.
        processor: its processor, with a chat template.
        messages: chat messages in content-parts form, ending with a user turn.
        max_new_tokens: the longest reply.

    Returns:
        The reply, special tokens removed.
    """
    inputs = processor.apply_chat_template(
        [messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {
        k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
        for k, v in inputs.items()
        if torch.is_tensor(v)
    }
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    finally:
        model.train(was_training)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    return processor.decode(new_tokens, skip_special_tokens=True).strip()
