"""The built-in tokenizer training corpus of the tiny twins."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

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
