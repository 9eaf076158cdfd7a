"""Turns conversation samples into a model batch with answer-only labels.

Labels cover exactly the assistant replies as the model would generate them, each with the token
that stops generation; everything else (system, prompt, image and padding tokens) is ``-100``.
There is no per-family string matching; the processor's capabilities choose the rendering:

- a chat template (every hub chat checkpoint's, as it ships): each reply ``i`` is what
  ``conversation[:i+1]`` renders after ``conversation[:i]`` with the generation prompt, without
  trailing whitespace, so it is labelled exactly as the model generates it after the prompt the
  template gives at that turn. When the template renders the whole conversation as the
  concatenation of those turns, the sample is one row labelled at every reply; when it renders
  history differently from generation (Qwen3 / Qwen3.5 thinking templates drop earlier turns'
  reasoning, Gemma 4's likewise), the sample becomes one row per reply, each after the prompt
  the model would have seen. The processor's offset mapping turns character spans into tokens
  exactly as transformers does for ``{% generation %}`` spans. A template that does not render
  a reply after its own generation prompt is used through its ``{% generation %}`` blocks when
  it has them;
- no chat template but a ``suffix=`` argument (PaliGemma, a prefix-LM): the user turn is the
  prefix, the reply the suffix; the processor builds ``token_type_ids`` and the labels. A prefix-LM
  sample holds one user turn (optionally after a system turn) and one reply: a multi-turn sample
  is dropped with that reason, because folding earlier replies into the prefix would silently
  stop training on them.

Thinking: ``chat_template_kwargs`` pass through to the template (``enable_thinking`` is False
unless they set it); a sample with reasoning on an assistant turn (a ``reasoning``, ``thinking``
or ``reasoning_content`` string) renders with ``enable_thinking=True``, its reasoning inside the
template's think block and labelled with the reply.

Samples that would break the model or the loss are dropped from the batch with a reason
(``batch["dropped"]``, printed and counted by the training loop): no reply or an empty reply, an
image inside an assistant or system turn, text that spells one of the tokenizer's special tokens
(``<image>`` typed in a prompt would otherwise become an image placeholder without features).

The vision-token budget: a row longer than ``max_length`` is cut only when all its image tokens
and at least one label token survive. Otherwise, when the image processor takes ``max_pixels``
(dynamic resolution: Qwen2-VL, Qwen2.5-VL) the sample's images are shrunk until it fits; when it
still does not fit (or the family has a fixed number of tokens per image), ``on_overlength``
decides: ``drop`` (default) or ``error``.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import weakref
from typing import Any, Literal, get_args

import torch
from jinja2 import TemplateError
from PIL import Image

from automodel.common import IGNORE_INDEX, SEQUENCE_KEYS
from automodel.errors import UsageError
from automodel.models import families

logger = logging.getLogger(__name__)

OnOverlength = Literal["drop", "error"]
OVERLENGTH_POLICIES = get_args(OnOverlength)

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

# Where a sample's assistant turn may carry its reasoning (the thinking before the reply).
REASONING_KEYS = ("reasoning", "thinking", "reasoning_content")

# Attempts at shrinking an over-length sample's images before the policy applies.
_RESIZE_ATTEMPTS = 3


def image_token_ids(processor) -> list[int]:
    """Ids of the tokens that stand for image features (never labelled, never truncated): the
    processor's and its tokenizer's attributes that the family registry names."""
    return families.image_token_ids(processor)


# ------------------------------------------------------------------------------ capabilities
def template_kwargs(
    processor, conversations: list[list[dict]], chat_template_kwargs: dict | None = None
) -> dict[str, Any]:
    """What ``apply_chat_template`` renders ``conversations`` with: ``chat_template_kwargs``
    over ``enable_thinking=False``, thinking turned on when a sample carries reasoning on an
    assistant turn, and ``chat_template=`` when the family's template needs a fix-up."""
    kwargs: dict[str, Any] = dict(chat_template_kwargs or {})
    template = families.chat_template(processor) or ""
    # Only a template that reads the switch gets it (transformers passes any other keyword to
    # the processor, with a warning).
    if re.search(r"\benable_thinking\b", template):
        kwargs.setdefault("enable_thinking", False)
        if any(_reasoning(m) for c in conversations for m in c if m["role"] == "assistant"):
            kwargs["enable_thinking"] = True
    if families.family_of_processor(processor).template_fixup is not None:
        kwargs["chat_template"] = template
    return kwargs


def has_generation_markers(processor) -> bool:
    """True when the processor's chat template marks replies with ``{% generation %}``."""
    template = families.chat_template(processor)
    return bool(template and _GENERATION_TAG.search(template))


def is_prefix_lm(processor) -> bool:
    """True for prefix-LM processors (PaliGemma): no chat template, a ``suffix=`` argument."""
    if families.chat_template(processor) is not None:
        return False
    return "suffix" in inspect.signature(type(processor).__call__).parameters


def resizes_by_max_pixels(processor) -> bool:
    """True when the image processor sizes images by ``max_pixels`` (dynamic resolution)."""
    image_processor = getattr(processor, "image_processor", None)
    valid = getattr(type(image_processor), "valid_kwargs", None)
    return "max_pixels" in getattr(valid, "__annotations__", {})


def _max_pixels(processor) -> int:
    image_processor = processor.image_processor
    value = getattr(image_processor, "max_pixels", None)
    if value is None:
        value = image_processor.size["longest_edge"]
    return int(value)


_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_ids(tokenizer) -> frozenset[int]:
    # Once per tokenizer: Gemma 3's has thousands of added tokens (the 262k tiny twin 260k),
    # and reading them (even len(tokenizer)) took up to seconds for every message.
    if tokenizer not in _SPECIAL_IDS:
        ids = set(tokenizer.all_special_ids)
        ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        _SPECIAL_IDS[tokenizer] = frozenset(ids)
    return _SPECIAL_IDS[tokenizer]


def _spelled_special(text: str, processor) -> str | None:
    """The first special token that ``text`` spells, as the tokenizer itself reads it.

    The tokenizer's own matcher, not a regex: a regex alternation of Gemma 3's added tokens takes
    from seconds (real vocabulary) to a minute (the 262k twin) to compile in every worker.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    # Image tokens count even where a tokenizer does not mark them special: the processor
    # expands each one it finds in the text into an image's run of tokens.
    specials = _special_ids(tokenizer) | set(image_token_ids(processor))
    for token_id in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if token_id in specials:
            return tokenizer.convert_ids_to_tokens(token_id)
    return None


# ------------------------------------------------------------------------------ samples
def _normalize(conversation: list[dict]) -> list[dict]:
    """Content as a list of parts (some templates index ``content[0]``), images loaded."""
    from transformers.image_utils import load_image

    messages = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content or []:
            if part.get("type") == "image" or "image" in part:
                image = part.get("image", part.get("url", part.get("path")))
                if image is not None and not isinstance(image, Image.Image):
                    image = load_image(image)
                part = {"type": "image", "image": image}
            parts.append(part)
        normalized = {"role": message["role"], "content": parts}
        reasoning = _reasoning(message)
        if reasoning:
            # Each template reads reasoning under its own name (Qwen3.5 reasoning_content,
            # Gemma 4 reasoning, LFM2.5 thinking).
            normalized.update(dict.fromkeys(REASONING_KEYS, reasoning))
        messages.append(normalized)
    return messages


def _reasoning(message: dict) -> str | None:
    """The reasoning a turn carries (the first non-empty ``REASONING_KEYS`` string), or None."""
    for key in REASONING_KEYS:
        value = message.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _text(message: dict) -> str:
    return "".join(p.get("text", "") for p in message["content"] if p.get("type") == "text")


def _images(conversation: list[dict]) -> list[Image.Image]:
    return [p["image"] for m in conversation for p in m["content"] if p.get("type") == "image"]


def sample_problem(conversation: list[dict], processor) -> str | None:
    """Why a conversation cannot be trained on, or None when it can.

    Args:
        conversation: chat messages (content as a string or a list of parts).
        processor: the model's processor (its special tokens and capabilities matter).

    Returns:
        A one-line reason, or None.
    """
    conversation = _normalize(conversation)
    replies = [m for m in conversation if m["role"] == "assistant"]
    if not replies:
        return "the sample has no assistant reply to learn from"
    users = 0
    for turn, message in enumerate(conversation):
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            return f"turn {turn} has role {role!r}; use system, user or assistant"
        users += role == "user"
        if role == "assistant" and not users:
            return f"turn {turn} is a reply before any user turn; a reply needs a prompt"
        for part in message["content"]:
            if part.get("type") == "image":
                if part.get("image") is None:
                    return f"turn {turn} has an image part without an image"
                if role != "user":
                    return f"turn {turn} ({role}) holds an image; images belong in user turns"
        spelled = _spelled_in_turn(turn, message, processor)
        if spelled:
            return spelled
        if role == "assistant" and not _text(message).strip():
            return f"turn {turn} is an empty assistant reply"
    if is_prefix_lm(processor):
        users = [m for m in conversation if m["role"] == "user"]
        if len(replies) != 1 or len(users) != 1 or conversation[-1]["role"] != "assistant":
            return (
                f"a prefix-LM ({type(processor).__name__}) takes one user turn and one reply per "
                f"sample, this one has {len(users)} user turn(s) and {len(replies)} reply(ies); "
                "split it into one sample per reply"
            )
        if not _images(conversation):
            return f"a prefix-LM ({type(processor).__name__}) needs an image in every sample"
    return None


def prompt_problem(messages: list[dict], processor) -> str | None:
    """Why a prompt cannot be generated from (a turn spells a special token), or None.

    Args:
        messages: the chat messages before the reply to generate.
        processor: the model's processor.
    """
    for turn, message in enumerate(_normalize(messages)):
        spelled = _spelled_in_turn(turn, message, processor)
        if spelled:
            return spelled
    return None


def _spelled_in_turn(turn: int, message: dict, processor) -> str | None:
    # A turn's reasoning is rendered into the text too (inside the template's think block).
    found = _spelled_special(_text(message), processor) or _spelled_special(
        _reasoning(message) or "", processor
    )
    if not found:
        return None
    return (
        f"turn {turn} ({message['role']}) spells the special token {found!r} in its text, "
        "which the processor would read as a control or image token"
    )


# ------------------------------------------------------------------------------ rendering
def _labels(batch: dict, mask: torch.Tensor, processor) -> dict:
    input_ids = batch["input_ids"]
    labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    image_ids = torch.tensor(image_token_ids(processor), dtype=input_ids.dtype)
    labels[torch.isin(input_ids, image_ids)] = IGNORE_INDEX
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    batch["labels"] = labels
    return batch


def _render_with_markers(conversations: list[list[dict]], processor, kwargs: dict) -> dict:
    batch = processor.apply_chat_template(
        conversations,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "right"},
        return_assistant_tokens_mask=True,
        **kwargs,
    )
    batch = dict(batch)
    mask = torch.as_tensor(batch.pop("assistant_masks"))
    return _labels(
        batch, _without_trailing_whitespace(mask, batch["input_ids"], processor), processor
    )


def _without_trailing_whitespace(mask: torch.Tensor, input_ids: torch.Tensor, processor):
    """``mask`` with the whitespace-only tokens at the end of each reply unmarked.

    Some templates put the newline after the end-of-turn token inside ``{% generation %}``
    (LFM2.5-VL's): a model stops at that token and never writes what follows, and the reply
    spans found by prefixes end at the last non-whitespace character too.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    mask = mask.clone()
    for row, col in (mask[:, 1:] < mask[:, :-1]).nonzero().tolist() + [
        (r, mask.shape[1] - 1) for r in (mask[:, -1] == 1).nonzero().flatten().tolist()
    ]:
        while col >= 0 and mask[row, col] and not tokenizer.decode(input_ids[row, col]).strip():
            mask[row, col] = 0
            col -= 1
    return mask


class SampleRefused(ValueError):
    """The chat template refuses one conversation of a batch (``index``)."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index = index


class _NotAfterPrompt(Exception):
    """The template does not render a reply after its own generation prompt."""


def reply_rows(
    conversation: list[dict], processor, kwargs: dict
) -> list[tuple[str, list[tuple[int, int]], list[Image.Image]]]:
    """The rows ``conversation`` trains as: each row's rendered text, the character span of
    each reply it labels (with its stop token) and its images.

    Reply ``i`` is what ``conversation[:i+1]`` adds to ``conversation[:i]`` followed by the
    generation prompt, without trailing whitespace: the reply as the model generates it. One
    row labels every reply when the whole conversation renders as those turns in sequence;
    otherwise (the template renders history differently from generation) each reply gets its
    own row, after the prompt the model would have seen at that turn.

    Raises:
        _NotAfterPrompt: a reply does not render after its generation prompt.
    """

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )

    full = render(conversation, False)
    turns, whole = [], True
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = render(conversation[:i], True)
        upto = render(conversation[: i + 1], False)
        if not upto.startswith(before):
            raise _NotAfterPrompt(i)
        turns.append((upto, (len(before), len(upto.rstrip())), _images(conversation[:i])))
        whole = whole and full.startswith(upto)
    if whole:
        return [(full, [span for _, span, _ in turns], _images(conversation))]
    return [(text, [span], images) for text, span, images in turns]


def _render_by_prefixes(rows: list[tuple[str, list, list]], processor) -> dict:
    from transformers import BatchFeature

    texts = [text for text, _, _ in rows]
    images = [row_images for _, _, row_images in rows]
    bos = getattr(processor.tokenizer, "bos_token", None)
    batch = processor(
        text=texts,
        images=images if any(images) else None,
        padding=True,
        padding_side="right",
        # Python objects, made tensors below without the replacement offsets: some processors
        # (InternVL, Idefics3) wrap their output again and then try to make a tensor of the
        # offsets too, which fails when a later row has an image and the first has none.
        return_tensors=None,
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
        # The template already wrote <bos> when it starts with it (as apply_chat_template does).
        add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)),
    )
    batch = dict(batch)
    offsets = batch.pop("offset_mapping")
    replaced = batch.pop("text_replacement_offsets", None) or [[] for _ in texts]
    batch = dict(BatchFeature(batch, tensor_type="pt"))
    mask = torch.zeros_like(batch["input_ids"])
    for row, (_, row_spans, _) in enumerate(rows):
        # Image placeholders expand into many tokens: shift each span past the expansions before it.
        ends = [r["span"][1] for r in replaced[row]]
        gained = [0] + [r["new_span"][1] - r["span"][1] for r in replaced[row]]
        for start, end in row_spans:
            start = start + gained[_count_le(ends, start)]
            end = end + gained[_count_le(ends, end)]
            for pos, (token_start, token_end) in enumerate(offsets[row]):
                if token_start < end and token_end > start:
                    mask[row, pos] = 1
    return _labels(batch, mask, processor)


def _count_le(values: list[int], x: int) -> int:
    return sum(1 for v in values if v <= x)


def _render_prefix_lm(conversations: list[list[dict]], processor) -> dict:
    image_token = processor.image_token
    prompts, suffixes, images = [], [], []
    for conversation in conversations:
        sample_images = _images(conversation)
        prompt = "\n".join(_text(m) for m in conversation if m["role"] in ("system", "user"))
        # The processor puts <bos> after the image tokens and "\n" after the prompt.
        prompts.append(image_token * len(sample_images) + prompt)
        suffixes.append(_text(conversation[-1]))
        images.append(sample_images)
    batch = processor(
        text=prompts,
        images=images,
        suffix=suffixes,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    batch = dict(batch)
    labels = batch.pop("labels")
    return _labels(batch, torch.as_tensor(labels) != IGNORE_INDEX, processor)


def render_batch(
    conversations: list[list[dict]], processor, chat_template_kwargs: dict | None = None
) -> dict[str, Any]:
    """Renders conversations into model inputs plus ``labels`` (answer-only).

    Args:
        conversations: conversations in content-parts form (see ``sample_problem`` for what a
            trainable one looks like).
        processor: the model's Hugging Face processor.
        chat_template_kwargs: variables for the chat template (e.g. ``enable_thinking``).

    Returns:
        The processor's tensors plus ``labels`` (``-100`` everywhere but reply tokens),
        ``rows``: the conversation each row comes from (a conversation whose template renders
        history differently from generation becomes one row per reply), and ``num_images``:
        the images the rows hold.

    Raises:
        UsageError: the processor has no chat template, or a reply cannot be located.
        SampleRefused: the template refuses a conversation (e.g. roles that do not alternate).
    """
    conversations = [_normalize(c) for c in conversations]
    if is_prefix_lm(processor):
        batch = _render_prefix_lm(conversations, processor)
        return _with_rows(batch, conversations, range(len(conversations)))
    if families.chat_template(processor) is None:
        raise UsageError(
            f"the processor {type(processor).__name__} has no chat template; set one "
            "(processor.chat_template) or use a model folder that has chat_template.jinja"
        )
    rows, owners = [], []
    try:
        for index, conversation in enumerate(conversations):
            kwargs = template_kwargs(processor, [conversation], chat_template_kwargs)
            try:
                sample_rows = reply_rows(conversation, processor, kwargs)
            except TemplateError as e:
                raise SampleRefused(index, f"the chat template refuses the sample: {e}") from None
            rows += sample_rows
            owners += [index] * len(sample_rows)
    except _NotAfterPrompt:
        if not has_generation_markers(processor):
            raise UsageError(
                f"the chat template of {type(processor).__name__} does not render a reply "
                "after its own generation prompt, so replies cannot be located; give it a "
                "template that wraps each reply in {% generation %}...{% endgeneration %}"
            ) from None
        kwargs = template_kwargs(processor, conversations, chat_template_kwargs)
        batch = _render_with_markers(conversations, processor, kwargs)
        return _with_rows(batch, conversations, range(len(conversations)))
    batch = _render_by_prefixes(rows, processor)
    batch["rows"] = owners
    batch["num_images"] = sum(len(images) for _, _, images in rows)
    return batch


def _with_rows(batch: dict, conversations: list[list[dict]], owners) -> dict:
    batch["rows"] = list(owners)
    batch["num_images"] = sum(len(_images(c)) for c in conversations)
    return batch


def prompt_inputs(
    processor, prompts: list[list[dict]], chat_template_kwargs: dict | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs that prompt the next reply to each conversation (for ``generate``).

    Rows are padded on the left: a decoder continues from the last position of every row. A
    chat processor renders its template with the generation prompt (and the template variables
    training used); a prefix-LM (PaliGemma) gets its images and prompt as the prefix, as in
    training.

    Args:
        processor: the model's processor.
        prompts: conversations, each ending with a user turn.
        chat_template_kwargs: variables for the chat template (e.g. ``enable_thinking``).

    Returns:
        The processor's tensors for the batch.
    """
    prompts = [_normalize(p) for p in prompts]
    if is_prefix_lm(processor):
        images = [_images(p) for p in prompts]
        texts = [
            processor.image_token * len(imgs)
            + "\n".join(_text(m) for m in p if m["role"] in ("system", "user"))
            for p, imgs in zip(prompts, images)
        ]
        out = processor(
            text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"
        )
    else:
        out = processor.apply_chat_template(
            prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
            **template_kwargs(processor, prompts, chat_template_kwargs),
        )
    return dict(out)


# ------------------------------------------------------------------------------ budget
def _length_problem(row: int, batch: dict, image_ids: torch.Tensor, max_length: int | None):
    """Why row ``row`` cannot fit ``max_length``: (reason, is_overlength) or None."""
    labels = batch["labels"][row]
    length = int(batch["attention_mask"][row].sum())
    is_image = torch.isin(batch["input_ids"][row], image_ids)
    if max_length is not None and length > max_length:
        image_pos = is_image.nonzero()
        if len(image_pos) and int(image_pos.max()) >= max_length:
            return (
                f"{length} tokens ({int(is_image.sum())} image tokens, up to position "
                f"{int(image_pos.max())}) exceed max_length={max_length}"
            ), True
        labels = labels[:max_length]
        if not (labels != IGNORE_INDEX).any():
            return f"no reply token left within max_length={max_length} ({length} tokens)", True
    if not (labels != IGNORE_INDEX).any():
        return "the sample has no assistant reply to learn from", False
    return None


def _shrink(conversation: list[dict], scale: float, max_pixels: int) -> list[dict]:
    """A copy of ``conversation`` whose images cover ``scale`` of their processed area."""
    out = []
    for message in conversation:
        parts = []
        for part in message["content"]:
            if part.get("type") == "image":
                image = part["image"]
                area = min(image.width * image.height, max_pixels)
                factor = math.sqrt(area * scale / (image.width * image.height))
                size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
                part = {"type": "image", "image": image.resize(size, Image.BICUBIC)}
            parts.append(part)
        out.append({"role": message["role"], "content": parts})
    return out


def default_collate_fn(
    examples: list[dict[str, Any]],
    processor,
    max_length: int | None = None,
    on_overlength: OnOverlength = "drop",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Collates conversation samples into one padded batch.

    Args:
        examples: samples of the form ``{"conversation": [...]}`` (see the dataset builders).
        processor: the model's Hugging Face processor.
        max_length: the longest sequence kept; ``None`` keeps everything.
        on_overlength: what happens to a sample that cannot fit ``max_length`` without cutting
            its image tokens or all its reply tokens (after shrinking its images where the
            family sizes images by ``max_pixels``): ``drop`` it with a reason, or ``error``.
        chat_template_kwargs: variables for the chat template, e.g. ``{"enable_thinking":
            True}`` (thinking is off unless they or a sample's reasoning turn it on).

    Returns:
        The processor's tensors plus ``labels``, ``num_images`` (images fed, counted per row),
        ``dropped`` (a list of ``(name, reason)`` for samples left out) and ``resized``
        (``(name, scale)`` for samples whose images were shrunk); when no sample in the batch
        is usable, only ``dropped`` (a batch without rows, see ``has_rows``), so the reasons
        still reach the training loop. A sample whose template renders history differently
        from generation is one row per reply, so a batch may hold more rows than samples.

    Raises:
        UsageError: ``on_overlength="error"`` and a sample does not fit.
    """
    if on_overlength not in OVERLENGTH_POLICIES:
        raise UsageError(
            f"dataloader.collate_fn.on_overlength={on_overlength!r}: use one of "
            f"{', '.join(OVERLENGTH_POLICIES)}"
        )
    names = [_sample_name(example, i) for i, example in enumerate(examples)]
    conversations, dropped = _usable_conversations(examples, processor)
    fit = _Fit(processor, max_length, on_overlength, names, chat_template_kwargs)
    keep, batch = fit.render(conversations, dropped)
    if not keep:
        return {"dropped": [(names[i], why) for i, why in dropped]}
    if max_length is not None and batch["input_ids"].shape[1] > max_length:
        for key in SEQUENCE_KEYS:
            if key in batch and torch.is_tensor(batch[key]) and batch[key].dim() >= 2:
                batch[key] = batch[key][:, :max_length]
    resized = [(names[i], round(s, 4)) for i, s in fit.scales.items() if i in keep]
    for name, scale in resized:
        logger.warning("resized the images of sample %s to %.0f%% of their area", name, 100 * scale)
    batch["dropped"] = [(names[i], why) for i, why in dropped]
    batch["resized"] = resized
    return batch


def has_rows(batch: dict | None) -> bool:
    """Whether a collate's output holds rows to run: not ``None`` (a custom collate's empty
    batch) and not only the ``dropped`` samples of a batch that lost them all."""
    return batch is not None and "input_ids" in batch


def _usable_conversations(examples: list[dict], processor) -> tuple[dict, list]:
    """The samples' conversations by index, and ``(index, reason)`` for those left out (an
    unreadable image, or a ``sample_problem``)."""
    conversations: dict[int, list[dict]] = {}
    dropped: list[tuple[int, str]] = []
    for i, example in enumerate(examples):
        try:
            conversation = _normalize(example["conversation"])
        except (OSError, ValueError) as e:  # an unreadable image file or URL
            dropped.append((i, f"cannot load an image: {e}"))
            continue
        why = sample_problem(conversation, processor)
        if why is None:
            conversations[i] = conversation
        else:
            dropped.append((i, why))
    return conversations, dropped


class _Fit:
    """Renders a batch until every row fits ``max_length``: a row too long has its sample's
    images shrunk (families sized by ``max_pixels``) and is rendered again, or follows
    ``on_overlength``; a sample the template refuses is dropped."""

    def __init__(
        self,
        processor,
        max_length: int | None,
        on_overlength: str,
        names: list[str],
        chat_template_kwargs: dict | None = None,
    ):
        self.processor = processor
        self.max_length = max_length
        self.on_overlength = on_overlength
        self.names = names
        self.chat_template_kwargs = chat_template_kwargs
        self.image_ids = torch.tensor(image_token_ids(processor))
        self.can_resize = max_length is not None and resizes_by_max_pixels(processor)
        self.scales: dict[int, float] = {}
        self.attempts: dict[int, int] = {}

    def render(self, conversations: dict, dropped: list) -> tuple[list[int], dict | None]:
        """The kept indices and their batch; ``conversations`` (shrunk images) and ``dropped``
        are updated in place."""
        keep, batch = list(conversations), None
        while keep:
            try:
                batch = render_batch(
                    [conversations[i] for i in keep], self.processor, self.chat_template_kwargs
                )
            except SampleRefused as e:
                dropped.append((keep[e.index], str(e)))
                keep.pop(e.index)
                continue
            owners = [keep[k] for k in batch.pop("rows")]
            gone: set[int] = set()
            for row, i in enumerate(owners):
                problem = _length_problem(row, batch, self.image_ids, self.max_length)
                if problem is None or i in gone:
                    continue
                gone.add(i)
                why, overlength = problem
                if overlength and self.can_resize and _images(conversations[i]):
                    if self.attempts.get(i, 0) < _RESIZE_ATTEMPTS:
                        conversations[i] = self.shrink(conversations[i], i, row, batch)
                        continue
                    why += f" (images shrunk {self.attempts[i]} times, still too long)"
                if overlength and self.on_overlength == "error":
                    raise UsageError(
                        f"sample {self.names[i]}: {why}; raise dataloader.collate_fn.max_length "
                        "or set dataloader.collate_fn.on_overlength=drop"
                    )
                dropped.append((i, why))
            if not gone:
                break
            # Re-render without the bad samples: per-family image tensors (tiles, grids) are
            # laid out by the processor, so removing rows by hand would be family-specific.
            out = {i for i, _ in dropped}
            keep = [i for i in keep if i not in out]
        return keep, batch

    def shrink(self, conversation: list[dict], i: int, row: int, batch: dict) -> list[dict]:
        """The conversation with its images scaled so the image tokens aim at what is left of
        ``max_length`` after the text, with a margin for rounding to whole patches."""
        n_image = int(torch.isin(batch["input_ids"][row], self.image_ids).sum())
        length = int(batch["attention_mask"][row].sum())
        budget = max(1, self.max_length - (length - n_image))
        scale = min(0.9, 0.9 * budget / max(1, n_image))
        self.scales[i] = self.scales.get(i, 1.0) * scale
        self.attempts[i] = self.attempts.get(i, 0) + 1
        return _shrink(conversation, scale, _max_pixels(self.processor))


def _sample_name(example: dict, index: int) -> str:
    return str(example.get("id", example.get("_source", f"batch item {index}")))
