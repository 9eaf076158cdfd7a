"""Hub chat templates as they ship: the twins carry them verbatim, labels come from them as they
are (a family's fix-up where a template ends replies without a stop token), and templates that
render history differently from generation (thinking templates) label every reply as the model
would generate it."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import trl
from PIL import Image
from transformers import AutoProcessor

from automodel.datasets.collate import default_collate_fn, prompt_inputs
from automodel.errors import UsageError
from automodel.models.families import fix_chat_template
from automodel.twins import TWIN_FAMILIES, TWIN_TEMPLATES
from tests.conftest import labelled_spans

TRL_TEMPLATES = Path(os.path.dirname(trl.__file__)) / "chat_templates"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor_of(tiny_family):
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = AutoProcessor.from_pretrained(tiny_family(family))
        return copy.deepcopy(cache[family])

    return get


def _turn(role: str, *parts, **extra) -> dict:
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p}
        for p in parts
    ]
    return {"role": role, "content": content, **extra}


def _two_turns(**first_reply_extra) -> list[dict]:
    image = Image.new("RGB", (90, 60), (200, 30, 30))
    return [
        _turn("user", image, "What colour?"),
        _turn("assistant", "Red, mostly.", **first_reply_extra),
        _turn("user", "Sure?"),
        _turn("assistant", "Yes."),
    ]


def test_every_chat_twin_has_a_hub_template():
    # PaliGemma is a prefix-LM: its checkpoints ship no chat template.
    assert set(TWIN_TEMPLATES) == set(TWIN_FAMILIES) - {"paligemma"}


@pytest.mark.parametrize("family", sorted(TWIN_TEMPLATES))
def test_twin_carries_its_hub_template_verbatim(family, processor_of):
    template = TWIN_TEMPLATES[family]
    processor = processor_of(family)
    assert processor.chat_template == template.text() == processor.tokenizer.chat_template
    assert template.checkpoint.count("/") == 1 and template.source
    if template.trl_file:
        assert template.text().encode() == (TRL_TEMPLATES / template.trl_file).read_bytes()


def test_llava_fixup_labels_the_stop_token_and_ships_in_final_model(processor_of, tmp_path):
    processor = processor_of("llava")
    conversation = _two_turns()
    hub = default_collate_fn([{"conversation": conversation}], processor)
    assert labelled_spans(hub["labels"][0], processor.tokenizer) == [
        " Red, mostly.</s>",
        " Yes.</s>",
    ]
    notice = fix_chat_template(processor)
    assert notice and "</s>" in notice and "\n" not in notice
    assert fix_chat_template(processor) is None  # applied once
    processor.save_pretrained(tmp_path)
    shipped = AutoProcessor.from_pretrained(tmp_path)
    assert shipped.chat_template == processor.chat_template != TWIN_TEMPLATES["llava"].text()
    assert "eos_token" in shipped.chat_template
    again = default_collate_fn([{"conversation": conversation}], shipped)
    assert again["input_ids"].equal(hub["input_ids"]) and again["labels"].equal(hub["labels"])


def _qwen3_5(processor_of, name: str):
    """The Qwen2.5-VL twin's processor with a Qwen3.5 template (the same special tokens)."""
    processor = processor_of("qwen2_5_vl")
    processor.chat_template = (TRL_TEMPLATES / name).read_text()
    return processor


def _rows(batch, processor) -> list[tuple[str, list[str]]]:
    tokenizer = processor.tokenizer
    return [
        (
            tokenizer.decode(batch["input_ids"][r][batch["attention_mask"][r].bool()]),
            labelled_spans(batch["labels"][r], tokenizer),
        )
        for r in range(batch["input_ids"].shape[0])
    ]


def test_thinking_template_labels_each_reply_after_its_own_prompt(processor_of):
    """Qwen3.5 renders earlier replies without their think block and the last one with it: the
    conversation becomes one row per reply, each labelled as generated with thinking off."""
    processor = _qwen3_5(processor_of, "qwen3_5_think.jinja")
    batch = default_collate_fn([{"conversation": _two_turns()}], processor)
    assert batch["dropped"] == [] and batch["num_images"] == 2
    (first, first_labels), (second, second_labels) = _rows(batch, processor)
    assert first_labels == ["Red, mostly.<|im_end|>"]
    assert first.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nRed, mostly.<|im_end|>\n")
    assert second_labels == ["Yes.<|im_end|>"]
    # The earlier reply, in the second row's history, is rendered as the template renders history.
    assert "<|im_start|>assistant\nRed, mostly.<|im_end|>\n<|im_start|>user\nSure?" in second
    # Generation prompts the same way: thinking off, an empty think block written for it.
    prompt = prompt_inputs(processor, [_two_turns()[:1]])
    text = processor.tokenizer.decode(prompt["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("field", ["reasoning", "thinking", "reasoning_content"])
def test_reasoning_in_the_data_is_labelled_inside_the_think_block(processor_of, field):
    processor = _qwen3_5(processor_of, "qwen3_5_think.jinja")
    conversation = _two_turns(**{field: "It looks red."})
    batch = default_collate_fn([{"conversation": conversation}], processor)
    (first, first_labels), (_, second_labels) = _rows(batch, processor)
    # With reasoning the sample thinks: the prompt opens the think block, the model writes it.
    assert first.endswith("assistant\n<think>\nIt looks red.\n</think>\n\nRed, mostly.<|im_end|>\n")
    assert first_labels == ["It looks red.\n</think>\n\nRed, mostly.<|im_end|>"]
    assert second_labels == ["\n</think>\n\nYes.<|im_end|>"]


def test_chat_template_kwargs_turn_thinking_on(processor_of):
    processor = _qwen3_5(processor_of, "qwen3_5_nothink.jinja")
    off = default_collate_fn([{"conversation": _two_turns()}], processor)
    on = default_collate_fn(
        [{"conversation": _two_turns()}], processor, chat_template_kwargs={"enable_thinking": True}
    )
    assert [labels for _, labels in _rows(off, processor)] == [
        ["Red, mostly.<|im_end|>"],
        ["Yes.<|im_end|>"],
    ]
    assert [labels for _, labels in _rows(on, processor)] == [
        ["\n</think>\n\nRed, mostly.<|im_end|>"],
        ["\n</think>\n\nYes.<|im_end|>"],
    ]


def test_a_template_that_renders_turns_in_sequence_keeps_one_row(processor_of):
    processor = processor_of("qwen2_5_vl")
    batch = default_collate_fn([{"conversation": _two_turns()}], processor)
    assert [labels for _, labels in _rows(batch, processor)] == [
        ["Red, mostly.<|im_end|>", "Yes.<|im_end|>"]
    ]


# A reply rendered without the space its generation prompt ends with: it cannot be found after
# the prompt, so only {% generation %} blocks can locate it.
_OFFSET_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}\n{% else %}ASSISTANT:{% generation %}"
    "{{ m['content'][0]['text'] + eos_token }}{% endgeneration %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def test_generation_blocks_locate_replies_where_prefixes_cannot(processor_of):
    processor = processor_of("llava")
    processor.chat_template = _OFFSET_TEMPLATE
    batch = default_collate_fn([{"conversation": _two_turns()}], processor)
    assert [labels for _, labels in _rows(batch, processor)] == [["Red, mostly.</s>", "Yes.</s>"]]
    processor.chat_template = _OFFSET_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    with pytest.raises(UsageError, match="does not render a reply after its own generation"):
        default_collate_fn([{"conversation": _two_turns()}], processor)


def test_a_sample_the_template_refuses_is_dropped_not_fatal(processor_of):
    processor = processor_of("gemma3")  # Gemma 3's template requires alternating roles
    bad = [_turn("user", "Hi"), _turn("user", "Again"), _turn("assistant", "Ok")]
    batch = default_collate_fn(
        [{"id": "bad", "conversation": bad}, {"id": "good", "conversation": _two_turns()}],
        processor,
    )
    assert [name for name, _ in batch["dropped"]] == ["bad"]
    assert "chat template refuses" in batch["dropped"][0][1]
    assert batch["input_ids"].shape[0] == 1


def test_conversation_files_keep_an_assistant_turns_reasoning(tmp_path, processor_of):
    import json

    from automodel.datasets.vlm import make_conversation_dataset

    records = [
        {
            "messages": [
                {"role": "user", "content": "Two plus two?"},
                {"role": "assistant", "content": "4", "thinking": "2 + 2 = 4."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi", "reasoning": "users do not reason here"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = make_conversation_dataset(str(path))
    assert dataset[0]["conversation"][1]["reasoning"] == "2 + 2 = 4."
    processor = _qwen3_5(processor_of, "qwen3_5_think.jinja")
    batch = default_collate_fn([dataset[0]], processor)
    assert labelled_spans(batch["labels"][0], processor.tokenizer) == [
        "2 + 2 = 4.\n</think>\n\n4<|im_end|>"
    ]
    with pytest.raises(Exception, match="reasoning that is not an assistant turn"):
        dataset[1]
