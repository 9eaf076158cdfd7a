"""Tiny, randomly initialised twins of real vision-language model families.

A twin uses the real model, processor and chat template classes of its family, with sizes small
enough to fine-tune on a CPU in minutes. It is written as an ordinary Hugging Face folder, so every
code path that loads a hub checkpoint (``AutoModelForImageTextToText``, ``AutoProcessor``) loads it
unchanged, with no network access.

The pieces that do not depend on the family (the training corpus, tokenizer training, seeded
initialisation, generation config, saving) are module-level functions; a family builder only
chooses configs, special tokens and a chat template, and is registered in ``FAMILIES``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin
from transformers.utils import logging as hf_logging

from automodel import artifacts
from automodel.errors import UsageError

# --------------------------------------------------------------------------------------------
# Built-in tokenizer corpus
# --------------------------------------------------------------------------------------------

# The corpus covers what the tutorials fine-tune on (receipts, their JSON and Donut-style
# renderings, short questions and answers), so that those texts tokenize into a few tokens per
# word rather than into single bytes.

_PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture is worth a thousand words.",
    "What is shown in this image?",
    "Describe the image in one sentence.",
    "Read the receipt and return the items as JSON.",
    "Extract the menu items, quantities and prices from the receipt.",
    "What is the total amount on the receipt?",
    "How much change did the customer get back?",
    "The receipt lists two coffees and a pastry.",
    "The customer paid in cash and received change.",
    "This photo shows a small cafe receipt printed on thermal paper.",
    "There is a cat sitting on a red chair next to the window.",
    "Two people are walking along the beach at sunset.",
    "A bowl of fresh fruit stands on the kitchen table.",
    "The sign above the door says the shop opens at nine.",
    "Answer the question using only the information in the picture.",
    "The document is a scanned invoice with a company logo at the top.",
    "Please summarize the text in the image.",
    "The chart shows sales growing every month of the year.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "She ordered a latte, a croissant and a glass of water.",
    "The tax is included in the price shown on the menu.",
    "Thank you for your visit, please come again!",
    "Keep this receipt as proof of purchase.",
    "Items can be returned within thirty days with the original receipt.",
    "The model reads text from images and answers questions about them.",
    "Fine-tuning adapts a pretrained model to a new task with a small dataset.",
    "The training loss went down steadily over the first hundred steps.",
    "Evaluation measures how close the predictions are to the references.",
    "You are a helpful assistant that reads receipts.",
    "You are a careful assistant. Answer briefly and accurately.",
    "Yes, the image contains a receipt.",
    "No, there is no person in the picture.",
    "The red car is parked in front of the blue house.",
    "Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in many documents.",
    "The store is located at 12 Main Street, Springfield.",
    "Date: 2024-03-15 Time: 14:32 Table: 7 Server: Anna",
    "Invoice No. 000123 issued on 01/02/2023 to Acme Corp.",
    "Every morning the baker makes bread, muffins and cookies.",
    "The meeting starts at 10:30 and ends at 11:45.",
]

_MENU = [
    "Latte",
    "Americano",
    "Iced Americano",
    "Cappuccino",
    "Espresso",
    "Mocha",
    "Flat White",
    "Chai Latte",
    "Hot Chocolate",
    "Green Tea",
    "Iced Tea",
    "Milk Tea",
    "Lemonade",
    "Orange Juice",
    "Mineral Water",
    "Croissant",
    "Almond Croissant",
    "Bagel",
    "Blueberry Muffin",
    "Cheesecake",
    "Brownie",
    "Chocolate Cookie",
    "Scone",
    "Donut",
    "Waffle",
    "Pancakes",
    "Club Sandwich",
    "Chicken Wrap",
    "Caesar Salad",
    "French Fries",
    "Cheeseburger",
    "Pizza Margherita",
    "Pasta Carbonara",
    "Tiramisu",
    "Ice Cream",
    "Nasi Goreng",
    "Mie Ayam",
    "Es Teh Manis",
    "Kopi Susu",
    "Roti Bakar",
]

# Two price styles: thousands with a comma (as on Indonesian receipts) and decimals.
_THOUSANDS = [
    "4,500",
    "9,000",
    "12,500",
    "15,000",
    "18,000",
    "22,000",
    "27,500",
    "32,000",
    "45,000",
    "8,800",
    "6,364",
    "38,000",
]
_DECIMALS = ["3.50", "4.25", "2.00", "5.75", "7.10", "12.99", "0.99", "1.50", "9.95", "15.00"]


def _price_value(price: str) -> float:
    return float(price.replace(",", ""))


def _format_like(value: float, like: str) -> str:
    """Format `value` in the style of `like` ("12,500" or "3.50")."""
    if "," in like:
        return f"{round(value):,}"
    return f"{value:.2f}"


def _receipt(index: int) -> dict[str, Any]:
    """A small CORD-style receipt, chosen deterministically from `index`."""
    prices = _THOUSANDS if index % 2 == 0 else _DECIMALS
    n_items = 1 + index % 3
    menu = []
    total = 0.0
    for k in range(n_items):
        name = _MENU[(index * 7 + k * 3) % len(_MENU)]
        unit = prices[(index * 5 + k) % len(prices)]
        count = 1 + (index + k) % 3
        amount = _price_value(unit) * count
        total += amount
        menu.append({"nm": name, "cnt": str(count), "price": _format_like(amount, unit)})
    like = prices[0]
    paid = math.ceil(total / 10) * 10 + (10 if index % 3 == 0 else 0)
    return {
        "menu": menu,
        "sub_total": {"subtotal_price": _format_like(total, like)},
        "total": {
            "total_price": _format_like(total, like),
            "cashprice": _format_like(paid, like),
            "changeprice": _format_like(paid - total, like),
        },
    }


def _donut(value: Any) -> str:
    """Render a JSON value as Donut-style tags: {"nm": "Latte"} -> <s_nm>Latte</s_nm>."""
    if isinstance(value, dict):
        return "".join(f"<s_{key}>{_donut(item)}</s_{key}>" for key, item in value.items())
    if isinstance(value, list):
        return "<sep/>".join(_donut(item) for item in value)
    return str(value)


def _receipt_lines(receipt: Mapping[str, Any]) -> Iterator[str]:
    """Plain-text receipt lines as an OCR of the printed receipt would give them."""
    for item in receipt["menu"]:
        yield f"{item['cnt']} x {item['nm']} {item['price']}"
    total = receipt["total"]
    yield f"SUBTOTAL {receipt['sub_total']['subtotal_price']}"
    yield f"Tax 10% included. TOTAL {total['total_price']}"
    yield f"CASH {total['cashprice']} CHANGE {total['changeprice']}"


def _words(text: str) -> list[str]:
    return text.split()


# Word lists composed into simple sentences below: they give the tokenizer enough distinct words
# to learn a vocabulary of about 2,000 tokens without filler.
_NOUNS = _words(
    "table chair window garden river mountain street market bakery kitchen station airport "
    "library museum office school hospital bridge forest island village city country teacher "
    "student doctor driver farmer artist waiter cashier manager customer child family friend "
    "neighbor bicycle train bus truck boat plane camera phone computer screen keyboard "
    "letter package ticket wallet umbrella basket bottle glass plate spoon knife fork candle "
    "flower tree picture painting building tower castle invoice voucher discount service "
    "charge member card balance payment refund order number guest delivery rounding amount "
    "quantity sugar syrup vanilla caramel hazelnut cinnamon cream butter cheese chicken beef "
    "rice noodle soup salad dessert breakfast lunch dinner document report chart graph "
    "question answer sentence paragraph word page title heading logo stamp signature "
    "animal horse rabbit bird dog cat fish sheep cow mirror pillow blanket jacket shirt shoe "
    "hat clock lamp door roof wall floor ceiling garage fence road path lake ocean beach cloud"
)
_ADJECTIVES = _words(
    "small large old new bright dark quiet busy happy tired hungry empty full warm cold "
    "green yellow purple orange white black golden silver wooden narrow wide heavy light "
    "famous modern ancient simple careful friendly strange beautiful expensive cheap "
    "regular medium extra fresh sweet spicy crispy frozen delicious printed handwritten "
    "blurry readable visible correct wrong complete partial final original digital"
)
_VERBS = _words(
    "found carried opened closed painted cleaned bought sold watched visited followed "
    "built moved checked counted printed signed delivered ordered prepared repaired "
    "described noticed remembered forgot returned collected photographed measured "
    "scanned wrote read answered explained compared calculated included received paid "
    "served cooked baked poured wrapped shared reported recorded listed"
)
_PLACES = [
    "near the station",
    "behind the counter",
    "across the street",
    "inside the shop",
    "under the bridge",
    "beside the river",
    "at the corner",
    "on the second floor",
    "in the morning",
    "after lunch",
    "before dinner",
    "during the weekend",
]
_CALENDAR = _words(
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April "
    "May June July August September October November December"
)
_NUMBER_WORDS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty "
    "ninety hundred thousand million first second third half quarter"
)
# Role names as chat templates of the supported families render them.
_ROLES = ["user", "model", "assistant", "system", "User", "Assistant", "USER", "ASSISTANT"]


def _sentences(count: int) -> Iterator[str]:
    """Simple varied sentences, chosen with co-prime strides so every word appears."""
    for i in range(count):
        adjective = _ADJECTIVES[i % len(_ADJECTIVES)]
        noun = _NOUNS[(i * 7) % len(_NOUNS)]
        verb = _VERBS[(i * 3) % len(_VERBS)]
        other = _NOUNS[(i * 11 + 5) % len(_NOUNS)]
        place = _PLACES[i % len(_PLACES)]
        day = _CALENDAR[(i * 5) % len(_CALENDAR)]
        number = _NUMBER_WORDS[i % len(_NUMBER_WORDS)]
        yield f"The {adjective} {noun} {verb} {number} {other}s {place} on {day}."


def _chat_lines(count: int) -> Iterator[str]:
    """Role-prefixed turns, so that role names and line breaks get their own tokens."""
    for i in range(count):
        user = _ROLES[(2 * i) % len(_ROLES)]
        reply = _ROLES[(2 * i + 1) % len(_ROLES)]
        question = _PROSE[i % len(_PROSE)]
        answer = _PROSE[(i * 3 + 1) % len(_PROSE)]
        yield f"{user}\n{question}\n\n{reply}\n{answer}\n"


def default_corpus() -> list[str]:
    """Return the built-in tokenizer training corpus (about 700 short lines, always the same).

    Returns:
        Lines of English prose, receipt text, receipt JSON, Donut-style tagged receipts, and
        digit and punctuation lines.
    """
    lines = list(_PROSE)
    lines.extend(_sentences(160))
    lines.extend(_chat_lines(40))
    for index in range(60):
        receipt = _receipt(index)
        lines.extend(_receipt_lines(receipt))
        lines.append(json.dumps(receipt, ensure_ascii=False))
        lines.append(_donut(receipt))
    lines.extend(f"{name}: subtotal, total, cash, change, tax, qty, price" for name in _MENU)
    lines.append(" ".join(str(n) for n in range(101)))
    lines.append("! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~")
    lines.append('{"question": "What is the total?", "answer": "9,000"}')
    return lines


# --------------------------------------------------------------------------------------------
# Shared builders
# --------------------------------------------------------------------------------------------


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


def generation_config(
    tokenizer: PreTrainedTokenizerFast, stop_tokens: list[str]
) -> GenerationConfig:
    """A greedy generation config that stops at any of `stop_tokens`.

    Args:
        tokenizer: The family's tokenizer (supplies bos and pad ids).
        stop_tokens: Tokens that end generation, e.g. the end-of-sequence and end-of-turn tokens
            (a model trained on chat replies ends them with end-of-turn).

    Returns:
        The generation config to attach to the model.
    """
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[token_id(tokenizer, token) for token in stop_tokens],
        pad_token_id=tokenizer.pad_token_id,
    )


def init_model(
    factory: Callable[[], PreTrainedModel],
    seed: int,
    after_init: Callable[[PreTrainedModel], None] | None = None,
) -> PreTrainedModel:
    """Build a model with weights drawn from `seed`, leaving the global RNG as it was.

    Args:
        factory: Builds the model from its config (its weights are initialised while it runs).
        seed: Seed for all random weights.
        after_init: Optional extra initialisation, run under the same seeded RNG.

    Returns:
        The float32 model in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also reseed (and leave changed) the
        # accelerator generators, which fork_rng(devices=[]) does not restore.
        torch.random.default_generator.manual_seed(seed)
        # Initialise on the CPU generator (the one forked and seeded here) even when the caller
        # set another default device, so the weights depend on the seed alone.
        with torch.device("cpu"):
            model = factory()
        if after_init is not None:
            with torch.no_grad():
                after_init(model)
    return model.to(torch.float32).eval()


def save_twin(
    model: PreTrainedModel, processor: ProcessorMixin, out_dir: Path, gen_config: GenerationConfig
) -> None:
    """Write model, generation config and processor (tokenizer included) into `out_dir`."""
    model.generation_config = gen_config
    # A one-shard progress bar is noise in the CLI output; restore the caller's setting after.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out_dir)


def resolve_sizes(
    family: str, defaults: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge `overrides` into `defaults`, refusing names the family does not know.

    Args:
        family: Family name, for the error message.
        defaults: The family's default sizes.
        overrides: Values given by the caller.

    Returns:
        The merged sizes.
    """
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UsageError(
            f"unknown size override(s) {', '.join(unknown)} for tiny {family}; "
            f"known: {', '.join(defaults)}"
        )
    return {**defaults, **overrides}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


# --------------------------------------------------------------------------------------------
# Gemma 3
# --------------------------------------------------------------------------------------------

GEMMA3_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# Gemma 3's chat template (google/gemma-3-4b-it), except that each assistant reply and its
# <end_of_turn> are wrapped in {% generation %} so that apply_chat_template can return an
# assistant-token mask for training. The "\n" after <end_of_turn> stays outside: the model must
# learn to stop at <end_of_turn>, not to predict what follows it.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{ content | trim }}
    {%- elif content is iterable -%}
        {%- for item in content -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
{%- endmacro -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if role == 'model' -%}
        {%- generation -%}
            {{ render_content(message['content']) }}
            {{- '<end_of_turn>' }}
        {%- endgeneration -%}
        {{ '\n' }}
    {%- else -%}
        {{ render_content(message['content']) }}
        {{- '<end_of_turn>\n' }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    # Shorter than a long training sample, so the sliding-window mask is exercised.
    "sliding_window": 128,
    # Real Gemma 3 alternates five sliding-window layers with one global layer.
    "sliding_window_pattern": 6,
    "max_position_embeddings": 2048,
    "vision_hidden_size": 128,
    "vision_intermediate_size": 512,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 2,
    "image_size": 128,
    "patch_size": 16,
    "mm_tokens_per_image": 16,
    # Pixel normalisation, one value for all three channels (real Gemma 3 uses 0.5 / 0.5).
    "image_mean": 0.5,
    "image_std": 0.5,
}


def _gemma3_layer_types(num_layers: int, pattern: int) -> list[str]:
    # The last layer is always global so that a stack shorter than the pattern still has one
    # layer that sees the whole sequence (the image included).
    return [
        "full_attention" if (i + 1) % pattern == 0 or i == num_layers - 1 else "sliding_attention"
        for i in range(num_layers)
    ]


def _check_gemma3_sizes(s: Mapping[str, Any]) -> None:
    _require(
        s["hidden_size"] % s["num_attention_heads"] == 0,
        f"hidden_size={s['hidden_size']} must be a multiple of "
        f"num_attention_heads={s['num_attention_heads']}",
    )
    _require(
        s["num_attention_heads"] % s["num_key_value_heads"] == 0,
        f"num_attention_heads={s['num_attention_heads']} must be a multiple of "
        f"num_key_value_heads={s['num_key_value_heads']}",
    )
    _require(
        s["vision_hidden_size"] % s["vision_num_attention_heads"] == 0,
        f"vision_hidden_size={s['vision_hidden_size']} must be a multiple of "
        f"vision_num_attention_heads={s['vision_num_attention_heads']}",
    )
    _require(
        s["image_size"] % s["patch_size"] == 0,
        f"image_size={s['image_size']} must be a multiple of patch_size={s['patch_size']}",
    )
    _require(s["image_std"] > 0, f"image_std={s['image_std']} must be positive")
    # The projector average-pools the square patch grid down to a square grid of soft tokens.
    patches_per_side = s["image_size"] // s["patch_size"]
    tokens_per_side = math.isqrt(s["mm_tokens_per_image"])
    _require(
        tokens_per_side > 0
        and tokens_per_side**2 == s["mm_tokens_per_image"]
        and patches_per_side % tokens_per_side == 0,
        f"mm_tokens_per_image={s['mm_tokens_per_image']} must be a square whose side divides the "
        f"{patches_per_side}x{patches_per_side} patch grid (image_size / patch_size)",
    )


def _build_gemma3(out_dir: Path, seed: int, **overrides: Any) -> None:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    sizes = resolve_sizes("gemma3", GEMMA3_DEFAULTS, overrides)
    _check_gemma3_sizes(sizes)

    raw = train_tokenizer(GEMMA3_SPECIAL_TOKENS, sizes["vocab_size"], bos_token="<bos>")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        # Gemma3Processor reads these attributes (tokenizer.image_token, .boi_token_id, ...).
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    eos_ids = [tokenizer.eos_token_id, token_id(tokenizer, "<end_of_turn>")]

    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=sizes["head_dim"],
        # As in real Gemma 3, attention scores are scaled by 1/sqrt(head_dim).
        query_pre_attn_scalar=sizes["head_dim"],
        sliding_window=sizes["sliding_window"],
        layer_types=_gemma3_layer_types(
            sizes["num_hidden_layers"], sizes["sliding_window_pattern"]
        ),
        max_position_embeddings=sizes["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        layer_norm_eps=1e-6,
        # Gemma 3 reads the patch states, never the pooled head: with the head, its parameters
        # get no gradient and DDP stops on unused parameters.
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=sizes["mm_tokens_per_image"],
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    config.dtype = torch.float32

    def init_projection(model: PreTrainedModel) -> None:
        # Gemma 3 initialises the image projection to zeros, which makes a fresh model blind to
        # its images and leaves the vision tower without gradient on the first step. A trained
        # checkpoint never looks like that, so the twin draws it like any other weight.
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.normal_(0.0, config.initializer_range)

    model = init_model(lambda: Gemma3ForConditionalGeneration(config), seed, init_projection)

    image_processor = Gemma3ImageProcessor(
        size={"height": sizes["image_size"], "width": sizes["image_size"]},
        image_mean=[float(sizes["image_mean"])] * 3,
        image_std=[float(sizes["image_std"])] * 3,
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=sizes["mm_tokens_per_image"],
    )
    save_twin(model, processor, out_dir, generation_config(tokenizer, ["<eos>", "<end_of_turn>"]))


# --------------------------------------------------------------------------------------------
# Families shared pieces
# --------------------------------------------------------------------------------------------


def _check_heads(s: Mapping[str, Any], hidden: str, heads: str) -> None:
    _require(
        s[hidden] % s[heads] == 0,
        f"{hidden}={s[hidden]} must be a multiple of {heads}={s[heads]}",
    )


def _check_patches(s: Mapping[str, Any]) -> None:
    _require(
        s["image_size"] % s["patch_size"] == 0,
        f"image_size={s['image_size']} must be a multiple of patch_size={s['patch_size']}",
    )


def _llama_text_config(sizes: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast, eos_ids):
    """A Llama decoder config (the text model of LLaVA 1.5, SmolVLM and Idefics3)."""
    from transformers import LlamaConfig

    _check_heads(sizes, "hidden_size", "num_attention_heads")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
    )


# Sizes every small twin below starts from; a family adds or replaces what it needs.
_SMALL_TEXT: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
_SMALL_VISION: dict[str, Any] = {
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 2,
}


def _siglip_config(sizes: Mapping[str, Any]):
    from transformers import SiglipVisionConfig

    _check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    _check_patches(sizes)
    return SiglipVisionConfig(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        layer_norm_eps=1e-6,
        # Only patch states are read (as in the real PaliGemma and SigLIP LLaVA configs); an
        # unused pooling head would get no gradient and stop DDP.
        vision_use_head=False,
    )


# --------------------------------------------------------------------------------------------
# PaliGemma (2): a prefix-LM without a chat template
# --------------------------------------------------------------------------------------------

PALIGEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]

PALIGEMMA_DEFAULTS: dict[str, Any] = {
    **_SMALL_TEXT,
    "head_dim": 32,
    "sliding_window": 128,
    # PaliGemma 2's Gemma 2 decoder caps its logits: our label-position logits must too.
    "final_logit_softcapping": 30.0,
    **_SMALL_VISION,
    "image_size": 64,
    "patch_size": 16,
}


def _build_paligemma(out_dir: Path, seed: int, **overrides: Any) -> None:
    from transformers import (
        Gemma2Config,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    sizes = resolve_sizes("paligemma", PALIGEMMA_DEFAULTS, overrides)
    _check_heads(sizes, "num_attention_heads", "num_key_value_heads")
    raw = train_tokenizer(PALIGEMMA_SPECIAL_TOKENS, sizes["vocab_size"])
    # The processor writes <bos> into the text itself; the pair segment (the suffix) gets type
    # id 1, which the processor turns into labels and the model into its prefix-LM mask.
    raw.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=None,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokens_per_image = (sizes["image_size"] // sizes["patch_size"]) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": sizes["image_size"], "width": sizes["image_size"]},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.image_seq_length = tokens_per_image
    # The processor adds 1,152 <locXXXX>/<segXXX> tokens: size the vocabulary after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text_config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        head_dim=sizes["head_dim"],
        query_pre_attn_scalar=sizes["head_dim"],
        sliding_window=sizes["sliding_window"],
        final_logit_softcapping=sizes["final_logit_softcapping"],
        max_position_embeddings=sizes["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = PaliGemmaConfig(
        text_config=text_config,
        vision_config=_siglip_config(sizes),
        image_token_index=tokenizer.image_token_id,
        projection_dim=sizes["hidden_size"],
        hidden_size=sizes["hidden_size"],
    )
    config.vision_config.projection_dim = sizes["hidden_size"]
    config.dtype = torch.float32
    model = init_model(lambda: PaliGemmaForConditionalGeneration(config), seed)
    save_twin(model, processor, out_dir, generation_config(tokenizer, ["<eos>"]))


# --------------------------------------------------------------------------------------------
# Qwen2-VL and Qwen2.5-VL: dynamic resolution, mRoPE
# --------------------------------------------------------------------------------------------

QWEN_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL / Qwen2.5-VL-Instruct's chat template, with each assistant reply and its <|im_end|>
# wrapped in {% generation %} (the "\n" after it stays outside).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>{% endgeneration %}\n"
    "{% elif message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_VL_DEFAULTS: dict[str, Any] = {
    **_SMALL_TEXT,
    # mRoPE splits the rotary half-dimension (head_dim / 2 = 16) into temporal, height and
    # width sections; they must sum to it.
    "mrope_section": [4, 6, 6],
    **_SMALL_VISION,
    "patch_size": 14,
    # Dynamic resolution: an image becomes between min_pixels and max_pixels pixels, one token
    # per 28x28 (2x2 merged 14-pixel patches): 4 to 16 tokens here.
    "min_pixels": 4 * 28 * 28,
    "max_pixels": 16 * 28 * 28,
}


def _qwen_text_kwargs(sizes: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast) -> dict:
    _check_heads(sizes, "hidden_size", "num_attention_heads")
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    _require(
        sum(sizes["mrope_section"]) * 2 == head_dim,
        f"mrope_section={sizes['mrope_section']} must sum to head_dim / 2 = {head_dim // 2}",
    )
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["num_key_value_heads"],
        "max_position_embeddings": sizes["max_position_embeddings"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": list(sizes["mrope_section"]),
        },
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _build_qwen_vl(out_dir: Path, seed: int, family: str, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes(family, QWEN_VL_DEFAULTS, overrides)
    _check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    raw = train_tokenizer(QWEN_VL_SPECIAL_TOKENS, sizes["vocab_size"])
    tokenizer = wrap_tokenizer(
        raw,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    text = _qwen_text_kwargs(sizes, tokenizer)
    vision = {
        "depth": sizes["vision_num_hidden_layers"],
        "num_heads": sizes["vision_num_attention_heads"],
        "patch_size": sizes["patch_size"],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_5_vl":
        text_config = tf.Qwen2_5_VLTextConfig(**text)
        vision_config = tf.Qwen2_5_VLVisionConfig(
            **vision,
            hidden_size=sizes["vision_hidden_size"],
            intermediate_size=sizes["vision_intermediate_size"],
            out_hidden_size=sizes["hidden_size"],
            # Window attention in every block but the last, as in the real model.
            window_size=112,
            fullatt_block_indexes=[sizes["vision_num_hidden_layers"] - 1],
        )
        config_cls, model_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        processor_cls = tf.Qwen2_5_VLProcessor
    else:
        text_config = tf.Qwen2VLTextConfig(**text)
        vision_config = tf.Qwen2VLVisionConfig(
            **vision,
            embed_dim=sizes["vision_hidden_size"],
            mlp_ratio=sizes["vision_intermediate_size"] // sizes["vision_hidden_size"],
            hidden_size=sizes["hidden_size"],
        )
        config_cls, model_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
        processor_cls = tf.Qwen2VLProcessor
    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=token_id(tokenizer, "<|vision_end|>"),
    )
    config.dtype = torch.float32
    model = init_model(lambda: model_cls(config), seed)
    pixels = {"min_pixels": sizes["min_pixels"], "max_pixels": sizes["max_pixels"]}
    processor = processor_cls(
        image_processor=tf.Qwen2VLImageProcessor(patch_size=sizes["patch_size"], **pixels),
        video_processor=tf.Qwen2VLVideoProcessor(patch_size=sizes["patch_size"], **pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    stops = ["<|im_end|>", "<|endoftext|>"]
    save_twin(model, processor, out_dir, generation_config(tokenizer, stops))


def _build_qwen2_vl(out_dir: Path, seed: int, **overrides: Any) -> None:
    _build_qwen_vl(out_dir, seed, "qwen2_vl", **overrides)


def _build_qwen2_5_vl(out_dir: Path, seed: int, **overrides: Any) -> None:
    _build_qwen_vl(out_dir, seed, "qwen2_5_vl", **overrides)


# --------------------------------------------------------------------------------------------
# SmolVLM and Idefics3: image splitting into tiles
# --------------------------------------------------------------------------------------------

_IDEFICS3_IMAGE_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]


def _idefics3_template(start: str) -> str:
    """SmolVLM-Instruct's chat template (Idefics3 starts with another token), with each reply and
    its <end_of_utterance> wrapped in {% generation %}. The space after "Assistant:" is inside the
    block: the generation prompt ends at the colon, so the model must learn to write it."""
    return (
        start + "{% for message in messages %}{{message['role'] | capitalize}}"
        "{% if message['role'] == 'assistant' %}{{':'}}{% generation %}{{' '}}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
        "{% endif %}{% endfor %}<end_of_utterance>{% endgeneration %}"
        "{% else %}"
        "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
        "{% for line in message['content'] %}"
        "{% if line['type'] == 'text' %}{{line['text']}}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
        "<end_of_utterance>{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


SMOLVLM_CHAT_TEMPLATE = _idefics3_template("<|im_start|>")
IDEFICS3_CHAT_TEMPLATE = _idefics3_template("<|begin_of_text|>")

IDEFICS3_DEFAULTS: dict[str, Any] = {
    **_SMALL_TEXT,
    **_SMALL_VISION,
    # A 32-pixel tile of 8-pixel patches, pixel-shuffled by 2: 4 tokens per tile. Images are
    # resized to a 64-pixel longest edge and split into up to 2x2 tiles plus a global view.
    "image_size": 32,
    "patch_size": 8,
    "scale_factor": 2,
    "longest_edge": 64,
}


def _build_idefics3_like(out_dir: Path, seed: int, family: str, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes(family, IDEFICS3_DEFAULTS, overrides)
    _check_patches(sizes)
    _check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    smol = family == "smolvlm"
    bos, eos, pad = (
        ("<|im_start|>", "<end_of_utterance>", "<|im_end|>")
        if smol
        else ("<|begin_of_text|>", "<|end_of_text|>", "<pad>")
    )
    specials = list(dict.fromkeys([pad, "<|endoftext|>", bos, eos, *_IDEFICS3_IMAGE_TOKENS]))
    raw = train_tokenizer(specials, sizes["vocab_size"])
    template = SMOLVLM_CHAT_TEMPLATE if smol else IDEFICS3_CHAT_TEMPLATE
    tokenizer = wrap_tokenizer(
        raw,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        chat_template=template,
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    patches = sizes["image_size"] // sizes["patch_size"]
    _require(
        patches % sizes["scale_factor"] == 0,
        f"scale_factor={sizes['scale_factor']} must divide the {patches}x{patches} patch grid",
    )
    image_seq_len = (patches // sizes["scale_factor"]) ** 2
    vision_cls = tf.SmolVLMVisionConfig if smol else tf.Idefics3VisionConfig
    vision_config = vision_cls(
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_num_hidden_layers"],
        num_attention_heads=sizes["vision_num_attention_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
    )
    eos_ids = [token_id(tokenizer, eos), token_id(tokenizer, "<end_of_utterance>")]
    config_cls = tf.SmolVLMConfig if smol else tf.Idefics3Config
    config = config_cls(
        text_config=_llama_text_config(sizes, tokenizer, eos_ids),
        vision_config=vision_config,
        scale_factor=sizes["scale_factor"],
        image_token_id=tokenizer.image_token_id,
    )
    config.dtype = torch.float32
    model_cls = tf.SmolVLMForConditionalGeneration if smol else tf.Idefics3ForConditionalGeneration
    model = init_model(lambda: model_cls(config), seed)
    image_kwargs = {
        "do_image_splitting": True,
        "size": {"longest_edge": sizes["longest_edge"]},
        "max_image_size": {"longest_edge": sizes["image_size"]},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    if smol:
        processor = tf.SmolVLMProcessor(
            image_processor=tf.SmolVLMImageProcessor(**image_kwargs),
            video_processor=tf.SmolVLMVideoProcessor(
                size={"longest_edge": sizes["longest_edge"]},
                max_image_size={"longest_edge": sizes["image_size"]},
            ),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=template,
        )
    else:
        processor = tf.Idefics3Processor(
            image_processor=tf.Idefics3ImageProcessor(**image_kwargs),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=template,
        )
    stops = list(dict.fromkeys([eos, "<end_of_utterance>"]))
    save_twin(model, processor, out_dir, generation_config(tokenizer, stops))


def _build_smolvlm(out_dir: Path, seed: int, **overrides: Any) -> None:
    _build_idefics3_like(out_dir, seed, "smolvlm", **overrides)


def _build_idefics3(out_dir: Path, seed: int, **overrides: Any) -> None:
    _build_idefics3_like(out_dir, seed, "idefics3", **overrides)


# --------------------------------------------------------------------------------------------
# LLaVA 1.5 (CLIP tower) and LLaVA with a SigLIP tower
# --------------------------------------------------------------------------------------------

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# llava-hf/llava-1.5's chat template (USER: <image>\n... ASSISTANT: ...), except that each reply
# ends with </s> inside {% generation %}, as in LLaVA 1.5's own training format, so a fine-tuned
# model learns to stop. The space after "ASSISTANT:" is inside the block too: the generation
# prompt ends at the colon.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT:' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% generation %}{{ ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

LLAVA_DEFAULTS: dict[str, Any] = {
    **_SMALL_TEXT,
    **_SMALL_VISION,
    "image_size": 32,
    "patch_size": 8,
}


def _build_llava_like(out_dir: Path, seed: int, family: str, **overrides: Any) -> None:
    import transformers as tf

    sizes = resolve_sizes(family, LLAVA_DEFAULTS, overrides)
    _check_patches(sizes)
    _check_heads(sizes, "vision_hidden_size", "vision_num_attention_heads")
    raw = train_tokenizer(LLAVA_SPECIAL_TOKENS, sizes["vocab_size"], bos_token="<s>")
    tokenizer = wrap_tokenizer(
        raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=LLAVA_CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<image>"},
    )
    size = sizes["image_size"]
    if family == "llava":
        # LLaVA 1.5: CLIP, features of the second-to-last layer without the CLS token.
        vision_config = tf.CLIPVisionConfig(
            hidden_size=sizes["vision_hidden_size"],
            intermediate_size=sizes["vision_intermediate_size"],
            num_hidden_layers=sizes["vision_num_hidden_layers"],
            num_attention_heads=sizes["vision_num_attention_heads"],
            image_size=size,
            patch_size=sizes["patch_size"],
        )
        strategy, layer, extra_tokens = "default", -2, 1
        image_processor = tf.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    else:
        vision_config = _siglip_config(sizes)
        strategy, layer, extra_tokens = "full", -1, 0
        image_processor = tf.SiglipImageProcessor(
            size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    image_seq_length = (size // sizes["patch_size"]) ** 2
    config = tf.LlavaConfig(
        vision_config=vision_config,
        text_config=_llama_text_config(sizes, tokenizer, tokenizer.eos_token_id),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
    )
    config.dtype = torch.float32
    model = init_model(lambda: tf.LlavaForConditionalGeneration(config), seed)
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=sizes["patch_size"],
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    save_twin(model, processor, out_dir, generation_config(tokenizer, ["</s>"]))


def _build_llava(out_dir: Path, seed: int, **overrides: Any) -> None:
    _build_llava_like(out_dir, seed, "llava", **overrides)


def _build_llava_siglip(out_dir: Path, seed: int, **overrides: Any) -> None:
    _build_llava_like(out_dir, seed, "llava_siglip", **overrides)


# --------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------

# family name -> builder(out_dir, seed, **overrides), which writes the twin into out_dir.
FAMILIES: dict[str, Callable[..., None]] = {
    "gemma3": _build_gemma3,
    "paligemma": _build_paligemma,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "smolvlm": _build_smolvlm,
    "idefics3": _build_idefics3,
    "llava": _build_llava,
    "llava_siglip": _build_llava_siglip,
}


def make_tiny(
    family: str, out_dir: str | Path, seed: int = 0, reuse: bool = False, **overrides: Any
) -> Path:
    """Write a tiny, randomly initialised twin of a real VLM family as a Hugging Face folder.

    Args:
        family: One of `FAMILIES` (e.g. ``"gemma3"``).
        out_dir: Folder to write into; created if needed, existing files of the same names are
            overwritten.
        seed: Seed for the random weights. The same seed gives byte-identical files.
        reuse: Return ``out_dir`` untouched when it already holds a twin built with the same
            family, seed and overrides.
        **overrides: Size settings replacing the family's defaults (e.g. ``hidden_size=128``,
            ``num_hidden_layers=2``, ``image_size=64``, ``vocab_size=1024``).

    Returns:
        The folder, loadable with ``AutoModelForImageTextToText.from_pretrained`` and
        ``AutoProcessor.from_pretrained``.
    """
    if family not in FAMILIES:
        raise UsageError(f"unknown tiny model family {family!r}; known: {', '.join(FAMILIES)}")
    out = Path(out_dir)
    params = {"family": family, "seed": seed, "code": artifacts.code_version(__name__), **overrides}
    if reuse and artifacts.is_built(out, "tiny-model", params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    FAMILIES[family](out, seed, **overrides)
    artifacts.mark_built(out, "tiny-model", params)
    return out
