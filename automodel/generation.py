"""Greedy generation from conversations, shared by the CLI, evaluation and the training preview.

``generate_replies`` runs batches of prompts through ``model.generate`` with left padding (so
every row's last prompt token sits at the same position and the KV cache grows in step) and
returns the decoded replies. ``generate_reply`` is the one-conversation form;
``read_generation_inputs`` and ``generate_to_jsonl`` are ``automodel generate``'s folder and
JSONL modes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from automodel.datasets.collate import prompt_inputs, prompt_problem
from automodel.datasets.vlm.base import load_image
from automodel.datasets.vlm.sources import BadSampleError
from automodel.errors import UsageError
from automodel.models.forward import to_model


def prompt_messages(conversation: list[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
    return conversation if last is None else conversation[:last]


def reply_text(message: dict) -> str:
    """The text parts of one chat message, joined."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


@torch.no_grad()
def generate_replies(
    model,
    processor,
    prompts: Sequence[list[dict]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[str]:
    """Generates the assistant's next reply to each prompt (greedy, batched, KV cache).

    Prompts are padded on the left whatever the processor's default, because a decoder-only
    model continues from the last position of every row; right padding would put pad tokens
    between a short prompt and its reply.

    Args:
        model: a transformers VLM.
        processor: its processor, with a chat template.
        prompts: chat messages in content-parts form, each ending with a user turn.
        max_new_tokens: the longest reply.
        batch_size: prompts per ``generate`` call.
        on_batch: called with the number of prompts done after each batch (progress bars).
        chat_template_kwargs: variables for the chat template, as in training.

    Returns:
        One reply per prompt, in order, special tokens removed.
    """
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            inputs = to_model(prompt_inputs(processor, chunk, chat_template_kwargs), model)
            out = model.generate(
                **inputs, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True
            )
            new_tokens = out[:, inputs["input_ids"].shape[1] :]  # [B, new]
            texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
            replies.extend(t.strip() for t in texts)
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        model.train(was_training)
    return replies


def generate_reply(
    model,
    processor,
    messages: list[dict],
    max_new_tokens: int = 128,
    chat_template_kwargs: dict | None = None,
) -> str:
    """Generates the assistant's next reply to ``messages`` (greedy).

    Args:
        model: a transformers VLM.
        processor: its processor, with a chat template.
        messages: chat messages in content-parts form, ending with a user turn.
        max_new_tokens: the longest reply.

    Returns:
        The reply, special tokens removed.
    """
    replies = generate_replies(
        model, processor, [messages], max_new_tokens, 1, chat_template_kwargs=chat_template_kwargs
    )
    return replies[0]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_generation_inputs(
    image: str | Path | None = None, jsonl: str | Path | None = None, prompt: str | None = None
) -> list[dict]:
    """The ``(id, image, prompt)`` items of ``automodel generate``.

    Args:
        image: one image file, or a folder whose images (sorted by name) all get ``prompt``.
        jsonl: a file of ``{"image": PATH, "prompt": TEXT}`` lines (``id`` optional; image paths
            relative to the file's folder; ``prompt`` falls back to the ``prompt`` argument).
        prompt: the instruction for images without one.

    Returns:
        Dicts with ``id``, ``image`` (a path, or ``None`` for a text-only line) and ``prompt``.

    Raises:
        UsageError: a missing file, an unreadable line, or an item without a prompt.
    """
    items: list[dict] = []
    if jsonl is not None:
        path = Path(jsonl)
        if not path.is_file():
            raise UsageError(f"--jsonl file not found: {path}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{path}:{number}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object with image and prompt")
            text = row.get("prompt", prompt)
            if not isinstance(text, str) or not text:
                raise UsageError(f"{path}:{number}: no prompt (add a prompt key or pass --prompt)")
            source = row.get("image")
            image_path = None if source is None else (path.parent / str(source))
            if image_path is not None and not image_path.is_file():
                raise UsageError(f"{path}:{number}: image not found: {image_path}")
            items.append({"id": row.get("id", number), "image": image_path, "prompt": text})
        return items
    if image is None:
        raise UsageError("give --image (a file or a folder of images) or --jsonl")
    path = Path(image)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
    elif path.is_file():
        files = [path]
    else:
        raise UsageError(f"image not found: {path}")
    if not prompt:
        raise UsageError("--prompt is required with --image")
    return [{"id": p.name, "image": p, "prompt": prompt} for p in files]


def item_messages(item: dict) -> list[dict]:
    """The user turn of one generation item (its image decoded as training decodes images,
    then its prompt)."""
    content: list[dict] = []
    if item["image"] is not None:
        try:
            content.append({"type": "image", "image": load_image(str(item["image"]))})
        except BadSampleError as e:
            raise UsageError(f"cannot read image {item['image']}: {e}") from None
    content.append({"type": "text", "text": item["prompt"]})
    return [{"role": "user", "content": content}]


def check_prompts(processor, items: Sequence[dict]) -> None:
    """Raises ``UsageError`` naming the first item whose prompt spells a special token (an
    image placeholder typed in a prompt would stand for an image that is not there).

    Args:
        processor: the model's processor.
        items: from :func:`read_generation_inputs`.
    """
    for item in items:
        problem = prompt_problem([{"role": "user", "content": item["prompt"]}], processor)
        if problem:
            raise UsageError(f"prompt of item {item['id']!r}: {problem}; remove it from the prompt")


def generate_to_jsonl(
    model,
    processor,
    items: Sequence[dict],
    out_path: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Generates a reply per item and writes ``{"id", "image", "prompt", "prediction"}`` lines.

    Lines are written batch by batch, so an interrupted run keeps what it finished.

    Args:
        model: a transformers VLM.
        processor: its processor.
        items: from :func:`read_generation_inputs`.
        out_path: the JSONL file to write.
        max_new_tokens: the longest reply.
        batch_size: prompts per ``generate`` call (images are decoded one batch at a time).
        progress: show a progress bar.

    Returns:
        ``out_path``.
    """
    from tqdm.auto import tqdm

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out, "w", encoding="utf-8") as f,
        tqdm(total=len(items), desc="generating", unit="prompt", disable=not progress) as bar,
    ):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            replies = generate_replies(
                model, processor, [item_messages(i) for i in chunk], max_new_tokens, len(chunk)
            )
            for item, reply in zip(chunk, replies):
                row = {
                    "id": item["id"],
                    "image": None if item["image"] is None else str(item["image"]),
                    "prompt": item["prompt"],
                    "prediction": reply,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    return out
