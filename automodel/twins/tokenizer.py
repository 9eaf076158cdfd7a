"""Byte-level BPE tokenizers for the tiny twins: training, unused-token padding, wrapping."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from automodel.errors import UsageError
from automodel.twins.corpus import default_corpus


def train_tokenizer(
    special_tokens: list[str],
    vocab_size: int,
    bos_token: str | None = None,
    corpus: list[str] | None = None,
) -> Tokenizer:
    """Train a deterministic byte-level BPE tokenizer on the built-in corpus.

    Args:
        special_tokens: Tokens given the lowest ids, in order; they are never split.
        vocab_size: Exact size of the resulting vocabulary. When the corpus runs out of merges
            first, the rest is filled with ``<unusedN>`` entries that no merge produces (real
            Gemma checkpoints carry such placeholders too).
        bos_token: When given, a post-processor prepends it to every encoded text, as the
            family's own tokenizer does on a plain call.
        corpus: Training lines; defaults to `default_corpus()`.

    Returns:
        The trained `tokenizers.Tokenizer`.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(special_tokens) + len(alphabet) + 1
    if vocab_size < minimum:
        raise UsageError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs at least {minimum}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus if corpus is not None else default_corpus(), trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer = _with_unused_tokens(tokenizer, missing)
    if bos_token is not None:
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A $B:1",
            special_tokens=[(bos_token, bos_id)],
        )
    return tokenizer


def _with_unused_tokens(tokenizer: Tokenizer, count: int) -> Tokenizer:
    """``tokenizer`` with ``count`` more ``<unusedN>`` entries at the end of its BPE vocabulary.

    They are ordinary vocabulary entries that no merge produces, not added tokens: 260k added
    tokens cost about 0.5 GB and seconds to load, where a real 262k tokenizer keeps its tokens
    in the model's vocabulary.
    """
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    start = max(vocab.values()) + 1
    vocab.update({f"<unused{i}>": start + i for i in range(count)})
    return Tokenizer.from_str(json.dumps(spec))


def wrap_tokenizer(
    tokenizer: Tokenizer,
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    unk_token: str | None,
    chat_template: str | None,
    extra_special_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer as a transformers tokenizer.

    Args:
        tokenizer: The trained `tokenizers.Tokenizer`.
        bos_token: Beginning-of-sequence token, or None when the family has none.
        eos_token: End-of-sequence token.
        pad_token: Padding token.
        unk_token: Unknown token, or None.
        chat_template: Jinja chat template stored on the tokenizer.
        extra_special_tokens: Named extra tokens (e.g. ``{"image_token": "<image>"}``); each name
            becomes an attribute (``tok.image_token``, ``tok.image_token_id``) that processors read.

    Returns:
        The wrapped tokenizer; ``len()`` of it equals the vocabulary size.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        extra_special_tokens=extra_special_tokens or {},
        chat_template=chat_template,
    )


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """Return the id of `token`, which must be in the vocabulary."""
    index = tokenizer.convert_tokens_to_ids(token)
    if index is None or (index == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"token {token!r} is not in the tiny tokenizer's vocabulary")
    return index
