"""Every family right: answer-only labels, the vision-token budget, our loss against the model's
own, save / reload / generate, and each family's example YAML, on the tiny twins.

The twins are built once per session (``tiny_family`` in conftest.py); each family's tests take
about a second on 2 CPU cores, the example runs a few seconds each.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from automodel.cli import main as cli_main
from automodel.datasets.collate import (
    default_collate_fn,
    image_token_ids,
    is_prefix_lm,
    prompt_inputs,
)
from automodel.errors import UsageError
from automodel.loss import MaskedCrossEntropy
from automodel.models.families import family_of
from automodel.models.forward import label_logits
from automodel.training.checkpoint import save_hf_folder
from automodel.twins import TWIN_FAMILIES as FAMILIES
from tests.conftest import ROOT, labelled_spans, run_python


def end_of_turn(model) -> str:
    """The token that ends an assistant reply in the model family's format (the registry's)."""
    return family_of(model).stop_tokens[0]


EXAMPLES = {
    "gemma3": "gemma3_4b_it_cord_v2.yaml",
    "gemma4": "gemma4_e4b_it_cord_v2.yaml",
    "paligemma": "paligemma2_3b_pt_448_cord_v2.yaml",
    "qwen2_vl": "qwen2_vl_2b_instruct_cord_v2.yaml",
    "qwen2_5_vl": "qwen2_5_vl_3b_instruct_cord_v2.yaml",
    "qwen3_vl": "qwen3_vl_4b_instruct_cord_v2.yaml",
    "qwen3_5": "qwen3_5_4b_cord_v2.yaml",
    "smolvlm": "smolvlm_256m_instruct_cord_v2.yaml",
    "idefics3": "idefics3_8b_llama3_cord_v2.yaml",
    "llava": "llava_1_5_7b_cord_v2.yaml",
    "internvl": "internvl3_2b_hf_cord_v2.yaml",
    "lfm2_vl": "lfm2_5_vl_3b_cord_v2.yaml",
    "mistral3": "mistral_small_3_1_24b_instruct_2503_cord_v2.yaml",
}
# Each family's LoRA example: its full example plus a peft section (examples/vlm/*_peft.yaml).
PEFT_EXAMPLES = sorted((ROOT / "examples/vlm").glob("*_peft.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tiny_family):
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = tiny_family(family)
            cache[family] = (
                AutoProcessor.from_pretrained(path),
                AutoModelForImageTextToText.from_pretrained(path),
            )
        return cache[family]

    return get


def _image(color=(200, 30, 30), size=(90, 60)):
    return Image.new("RGB", size, color)


def _turn(role, *parts):
    return {
        "role": role,
        "content": [
            {"type": "image", "image": p}
            if isinstance(p, Image.Image)
            else {"type": "text", "text": p}
            for p in parts
        ],
    }


def _samples(family: str) -> tuple[list[dict], list[list[str]]]:
    """A batch with multi-turn, several images and a system turn (one turn for a prefix-LM)."""
    if family == "paligemma":
        first = [
            _turn("user", _image(), _image((0, 90, 0), (50, 80)), "Compare the colours."),
            _turn("assistant", "Red then green."),
        ]
        replies = [["Red then green."], ["Blue"]]
    else:
        first = [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            _turn("user", _image(), "What colour?"),
            _turn("assistant", "Red, mostly."),
            _turn("user", _image((0, 90, 0), (50, 80)), _image((9, 9, 9)), "And these two?"),
            _turn("assistant", '{"total": "9,000"}'),
        ]
        replies = [["Red, mostly.", '{"total": "9,000"}'], ["Blue"]]
    second = [_turn("user", _image((0, 0, 255)), "Colour?"), _turn("assistant", "Blue")]
    return [
        {"id": "first", "conversation": first},
        {"id": "second", "conversation": second},
    ], replies


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_are_exactly_the_replies(family, loaded):
    processor, model = loaded(family)
    examples, replies = _samples(family)
    batch = default_collate_fn(examples, processor)
    assert batch["dropped"] == []
    end = end_of_turn(model)
    # A template that renders history differently from generation (Qwen3.5's) makes one row per
    # reply; the others one row per sample. Either way the rows hold every reply once, in order.
    rows = [labelled_spans(labels, processor.tokenizer) for labels in batch["labels"]]
    assert len(rows) in (len(replies), sum(map(len, replies)))
    spans = [span for row in rows for span in row]
    # LLaVA and SmolVLM prompt with "ASSISTANT:" / "Assistant:": the reply's leading space is
    # the model's to write, so it is labelled too.
    expected = [r + end for sample in replies for r in sample]
    assert [s.removeprefix(" ") for s in spans] == expected, rows
    labelled = batch["labels"] != -100
    ids = torch.tensor(image_token_ids(processor))
    assert not torch.isin(batch["input_ids"], ids)[labelled].any(), "an image token has a label"
    assert not labelled[batch["attention_mask"] == 0].any(), "a padding token has a label"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "paligemma"])
def test_a_text_only_sample_may_come_before_one_with_images(family, loaded):
    """Rendering by prefixes: some processors (InternVL's, Idefics3's) cannot make tensors of
    their own replacement offsets when the first row has no image and a later one has."""
    processor, model = loaded(family)
    text_only = {"conversation": [_turn("user", "Hi there."), _turn("assistant", "Hello")]}
    batch = default_collate_fn([text_only, _samples(family)[0][1]], processor)
    spans = [labelled_spans(row, processor.tokenizer) for row in batch["labels"]]
    end = end_of_turn(model)
    assert [[s.removeprefix(" ") for s in row] for row in spans] == [
        ["Hello" + end],
        ["Blue" + end],
    ]


def test_prefix_lm_is_detected_by_capability(loaded):
    assert is_prefix_lm(loaded("paligemma")[0])
    assert not any(is_prefix_lm(loaded(f)[0]) for f in ("gemma3", "llava"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_loss_equals_the_models_own_loss(family, loaded):
    processor, model = loaded(family)
    examples, _ = _samples(family)
    batch = default_collate_fn(examples, processor)
    batch.pop("dropped"), batch.pop("resized")
    labels = batch.pop("labels")
    model.train()
    with torch.no_grad():
        reference = model(**batch, labels=labels).loss
        logits, targets = label_logits(model, batch, labels)
        ours = MaskedCrossEntropy()(logits, targets)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (float(ours), float(reference))


def _provocations(family: str, processor) -> tuple[list[dict], dict[str, str]]:
    """Samples that would make a processor emit image tokens without features (or the reverse),
    or give a batch without labels, and the reason each must be dropped with."""
    good = _samples(family)[0][1]
    typed = f"look: {processor.image_token} here"
    long_text = " ".join(["word"] * 120)
    examples = [
        {
            "id": "typed-image-token",
            "conversation": [_turn("user", _image(), typed), _turn("assistant", "x")],
        },
        {
            "id": "image-in-reply",
            "conversation": [_turn("user", _image(), "Hi"), _turn("assistant", _image(), "x")],
        },
        {
            "id": "image-missing",
            "conversation": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": None}, {"type": "text", "text": "Hi"}],
                },
                _turn("assistant", "x"),
            ],
        },
        {
            "id": "empty-reply",
            "conversation": [_turn("user", _image(), "Hi"), _turn("assistant", "  ")],
        },
        {"id": "no-reply", "conversation": [_turn("user", _image(), "Hi")]},
        # Over max_length: the image (or for a prefix-LM, every reply token) lies past the cut.
        {
            "id": "too-long",
            "conversation": [
                _turn("user", long_text, _image(), long_text),
                _turn("assistant", "y"),
            ],
        },
        {"id": "good", **good},
    ]
    reasons = {
        "typed-image-token": "special token",
        "image-in-reply": "images belong in user turns",
        "image-missing": "without an image",
        "empty-reply": "empty assistant reply",
        "no-reply": "no assistant reply",
        "too-long": "max_length",
    }
    if family == "paligemma":
        examples.append(
            {"id": "multi-turn", "conversation": _samples("gemma3")[0][0]["conversation"]}
        )
        reasons["multi-turn"] = "one user turn and one reply"
    return examples, reasons


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_collate_cannot_provoke_an_image_feature_mismatch(family, loaded):
    """Every sample that could desynchronise image tokens and features is dropped by name; the
    batch that is left runs through the model."""
    processor, model = loaded(family)
    examples, reasons = _provocations(family, processor)
    # Room for the good sample, whose template may add a long default system prompt (Mistral 3's).
    good = default_collate_fn([_samples(family)[0][1]], processor)
    max_length = max(160, int(good["attention_mask"].sum()))
    batch = default_collate_fn(examples, processor, max_length=max_length)
    dropped = dict(batch.pop("dropped"))
    assert set(dropped) == set(reasons), dropped
    for name, fragment in reasons.items():
        assert fragment in dropped[name], (name, dropped[name])
    batch.pop("resized")
    labels = batch.pop("labels")
    assert batch["input_ids"].shape[0] == 1 and (labels != -100).any()
    with torch.no_grad():
        model(**batch)  # raises "Image features and image tokens do not match" if they do not


@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncation_keeps_every_image_token_and_part_of_the_reply(family, loaded):
    processor, model = loaded(family)
    reply = " ".join(["seven"] * 60)
    example = {"conversation": [_turn("user", _image(), "Count."), _turn("assistant", reply)]}
    full = default_collate_fn([example], processor)
    ids = torch.tensor(image_token_ids(processor))
    n_image = int(torch.isin(full["input_ids"], ids).sum())
    first_label = int((full["labels"][0] != -100).nonzero()[0])
    max_length = first_label + 5
    cut = default_collate_fn([example], processor, max_length=max_length)
    assert cut["dropped"] == [] and cut["input_ids"].shape[1] == max_length
    assert int(torch.isin(cut["input_ids"], ids).sum()) == n_image
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :max_length])
    for key in ("attention_mask", "token_type_ids", "mm_token_type_ids", "labels"):
        if key in cut:
            assert cut[key].shape[1] == max_length, key
    cut.pop("dropped"), cut.pop("resized")
    labels = cut.pop("labels")
    assert (labels != -100).sum() > 0
    with torch.no_grad():
        assert torch.isfinite(model(**cut, labels=labels).loss)


def test_on_overlength_error_names_the_sample(loaded):
    processor, _ = loaded("llava")
    long_text = " ".join(["word"] * 120)
    examples = [
        {
            "id": "receipt-7",
            "conversation": [_turn("user", long_text, _image()), _turn("assistant", "y")],
        }
    ]
    with pytest.raises(UsageError, match="sample receipt-7: .*max_length=40.*on_overlength"):
        default_collate_fn(examples, processor, max_length=40, on_overlength="error")
    with pytest.raises(UsageError, match="on_overlength='cut'"):
        default_collate_fn(examples, processor, on_overlength="cut")


def test_dynamic_resolution_shrinks_an_over_budget_image(loaded):
    """Qwen2.5-VL sizes images by max_pixels: an over-length sample is resized, not dropped; a
    family with a fixed token count per image drops it instead."""
    processor, model = loaded("qwen2_5_vl")
    example = {
        "id": "big",
        "conversation": [
            _turn("user", _image(size=(400, 400)), "Read this receipt please."),
            _turn("assistant", "ok"),
        ],
    }
    full = default_collate_fn([example], processor)
    image_id = processor.image_token_id
    full_tokens = int((full["input_ids"] == image_id).sum())
    length = full["input_ids"].shape[1]
    assert full_tokens == 16  # max_pixels of the twin
    max_length = length - 8
    batch = default_collate_fn([example], processor, max_length=max_length)
    assert batch["dropped"] == [] and [n for n, _ in batch["resized"]] == ["big"]
    assert batch["input_ids"].shape[1] <= max_length
    assert int((batch["input_ids"] == image_id).sum()) < full_tokens
    batch.pop("dropped"), batch.pop("resized"), batch.pop("labels")
    with torch.no_grad():
        model(**batch)

    llava, _ = loaded("llava")
    short = {
        "id": "short",
        "conversation": [_turn("user", _image(), "Hi"), _turn("assistant", "ok")],
    }
    fits = default_collate_fn([short], llava)["input_ids"].shape[1]
    fixed = default_collate_fn([example, short], llava, max_length=fits)
    assert [n for n, _ in fixed["dropped"]] == ["big"] and fixed["resized"] == []


def test_train_save_reload_and_generate_in_a_fresh_process(loaded, tmp_path):
    """After a training step, final_model loads with the Auto classes in a fresh process and
    generates the same tokens; generation stops at the family's end-of-turn token."""
    expected = {}
    for family in FAMILIES:
        processor, model = loaded(family)
        model = copy.deepcopy(model).train()
        examples, _ = _samples(family)
        batch = default_collate_fn(examples[1:], processor)
        batch.pop("dropped"), batch.pop("resized")
        labels = batch.pop("labels")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        logits, targets = label_logits(model, batch, labels)
        MaskedCrossEntropy()(logits, targets).backward()
        optimizer.step()
        model.eval()
        inputs = prompt_inputs(processor, [examples[1]["conversation"][:1]])
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6)
        expected[family] = out[0, inputs["input_ids"].shape[1] :].tolist()
        save_hf_folder(model, processor, tmp_path / family)
        eos = model.generation_config.eos_token_id
        assert processor.tokenizer.convert_tokens_to_ids(end_of_turn(model)) in (
            eos if isinstance(eos, list) else [eos]
        )
    code = f"""
import json, torch
torch.set_num_threads(1)
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from automodel.datasets.collate import prompt_inputs
out = {{}}
for family in {list(FAMILIES)!r}:
    path = {str(tmp_path)!r} + "/" + family
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    messages = [{{"role": "user", "content": [
        {{"type": "image", "image": Image.new("RGB", (90, 60), (0, 0, 255))}},
        {{"type": "text", "text": "Colour?"}}]}}]
    inputs = prompt_inputs(processor, [messages])
    with torch.no_grad():
        tokens = model.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    out[family] = tokens[0, inputs["input_ids"].shape[1]:].tolist()
print("RESULT" + json.dumps(out))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    assert json.loads(line[len("RESULT") :]) == expected


def _tiny_run_overrides(cfg: dict, twin, receipts, checkpoint_dir) -> list[str]:
    """Overrides that point an example at the tiny twin and local receipts and shrink the run:
    paths, sizes (the processor's image size becomes the twin's) and float32 weights."""
    overrides = [
        f"--model.pretrained_model_name_or_path={twin}",
        "--model.torch_dtype=float32",
        f"--dataset.path_or_dataset={receipts}",
        f"--validation_dataset.path_or_dataset={receipts}",
        "--validation_dataset.limit=2",
        "--step_scheduler.max_steps=2",
        "--step_scheduler.global_batch_size=2",
        "--step_scheduler.local_batch_size=2",
        "--step_scheduler.log_every_steps=1",
        "--dataloader.num_workers=0",
        "--dataloader.collate_fn.on_overlength=error",
        f"--checkpoint.checkpoint_dir={checkpoint_dir}",
    ]
    if "processor" in cfg:
        saved = json.loads((twin / "processor_config.json").read_text())
        twin_size = saved.get("image_processor", saved)["size"]
        overrides.append(f"--processor.pretrained_model_name_or_path={twin}")
        for key in cfg["processor"].get("size", {}):
            overrides.append(f"--processor.size.{key}={twin_size[key]}")
    if "image_size" in cfg["dataset"]:
        overrides += ["--dataset.image_size=128", "--validation_dataset.image_size=128"]
    return overrides


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_example_yaml_trains_the_tiny_twin(family, tiny_family, receipts, tmp_path, capsys):
    """Each family's example (a real hub checkpoint) runs as is with only paths and sizes
    overridden to the tiny twin; the run prints its trainable / total parameters."""
    path = ROOT / "examples/vlm" / EXAMPLES[family]
    cfg = yaml.safe_load(path.read_text())
    assert cfg["model"]["pretrained_model_name_or_path"].count("/") == 1  # a hub id
    assert cfg["dataset"]["path_or_dataset"] == "naver-clova-ix/cord-v2"
    assert path.read_text().splitlines()[1].strip("# ").startswith("automodel finetune vlm -c")
    overrides = _tiny_run_overrides(cfg, tiny_family(family), receipts, tmp_path / "ckpt")
    code = cli_main(["finetune", "vlm", "-c", str(path), *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert re.search(r"parameters: [\d,]+ trainable / [\d,]+ total", out.out)
    assert "step 2/2 | loss" in out.out
    # A family whose hub template needs a fix-up says so in one line when the run starts.
    fixed = "chat template: llava: its hub chat template ends replies without </s>"
    assert (fixed in out.out) == (family == "llava")
    records = [json.loads(x) for x in (tmp_path / "ckpt/training.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in records) and "vision_loss" not in records[0]
    assert (tmp_path / "ckpt/final_model/config.json").is_file()


def _family_of_peft_example(path) -> str:
    """The twin family of a LoRA example: the family whose full example it extends."""
    full = path.name.removesuffix("_peft.yaml") + ".yaml"
    by_file = {file: family for family, file in EXAMPLES.items()}
    if full not in by_file:
        pytest.fail(
            f"{path.name} extends {full}, which is not in EXAMPLES (family -> example) in "
            "tests/test_families.py: add the full example there with its twin family"
        )
    return by_file[full]


def test_every_family_example_has_a_lora_twin_that_only_adds_lora():
    """X_peft.yaml is X.yaml plus a default peft section, lr 1e-4 and a checkpoint_dir ending
    in _lora; nothing else differs."""
    from automodel.config.loader import load_yaml

    assert {p.name for p in PEFT_EXAMPLES} >= {
        f.removesuffix(".yaml") + "_peft.yaml" for f in EXAMPLES.values()
    }
    for path in PEFT_EXAMPLES:
        lora = load_yaml(path)
        full = load_yaml(ROOT / "examples/vlm" / EXAMPLES[_family_of_peft_example(path)])
        assert lora.pop("peft") == {
            "_target_": "automodel.peft.LoraConfig", "r": 16, "alpha": 32, "dropout": 0.0
        }, path.name  # fmt: skip
        assert lora["optimizer"].pop("lr") == 1e-4 > full["optimizer"].pop("lr"), path.name
        assert (
            lora["checkpoint"].pop("checkpoint_dir")
            == full["checkpoint"].pop("checkpoint_dir") + "_lora"
        )
        assert lora == full, path.name
        assert path.read_text().splitlines()[1].strip("# ").startswith("automodel finetune vlm -c")


@pytest.mark.parametrize("path", PEFT_EXAMPLES, ids=lambda p: p.name)
def test_lora_example_trains_the_tiny_twin_and_adapts_only_the_language_model(
    path, tiny_family, receipts, tmp_path, capsys
):
    """Each LoRA example runs two steps on its family's twin and writes final_adapter, whose
    adapters sit on language-model layers only: none on the vision tower or the projector."""
    from automodel.models.families import FAMILIES as REGISTRY

    family = _family_of_peft_example(path)
    twin = tiny_family(family)
    cfg = yaml.safe_load(path.read_text())
    overrides = _tiny_run_overrides(cfg, twin, receipts, tmp_path / "ckpt")
    code = cli_main(["finetune", "vlm", "-c", str(path), *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "step 2/2 | loss" in out.out
    adapter_dir = tmp_path / "ckpt/final_adapter"
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (16, 32)
    # PEFT saves target_modules as the shortest unambiguous name suffixes ("2.self_attn.q_proj"):
    # the adapted modules are those the saved adapter attaches to when loaded on the base.
    from peft import PeftModel

    base = AutoModelForImageTextToText.from_pretrained(twin)
    entry = REGISTRY[base.config.model_type]
    loaded = PeftModel.from_pretrained(base, adapter_dir).base_model.model
    adapted = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")]
    vision = tuple(f"{p}." for p in entry.tower + entry.projector)
    assert adapted and not [n for n in adapted if n.startswith(vision)]
    assert all(n.startswith(tuple(f"{p}." for p in entry.decoder)) for n in adapted), adapted


NEMO_COPY = ROOT / "tests/data/nemo/gemma3_vl_4b_cord_v2.yaml"


def test_nemo_automodels_current_config_trains_the_tiny_twin(
    tiny_family, receipts, tmp_path, capsys
):
    """NeMo AutoModel's own Gemma 3 config, copied verbatim, runs through its command line
    (``automodel CONFIG.yaml``) with only paths, the run's size and the dtype overridden."""
    lines = NEMO_COPY.read_text().splitlines()
    assert lines[0].startswith("# Verbatim copy of NVIDIA-NeMo/Automodel ")
    assert "recipe: FinetuneRecipeForVLM" in lines and "ci:" in lines
    overrides = [
        f"--model.pretrained_model_name_or_path={tiny_family('gemma3')}",
        f"--dataset.path_or_dataset={receipts}",
        f"--validation_dataset.path_or_dataset={receipts}",
        f"--checkpoint.checkpoint_dir={tmp_path / 'ckpt'}",
        "--validation_dataset.limit=2",
        "--step_scheduler.max_steps=2",
        "--step_scheduler.global_batch_size=2",
        "--model.torch_dtype=float32",  # bfloat16 matmuls run ~5x slower on this CPU
    ]
    code = cli_main([str(NEMO_COPY), *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "note: ci: NeMo AutoModel's CI settings" in out.out
    assert "step 2/2 | loss" in out.out
    assert (tmp_path / "ckpt/final_model/config.json").is_file()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_replies_works_for_every_family(family, loaded):
    """Batched, left-padded generation (preview, evaluate, generate) for chat and prefix-LMs."""
    from automodel.generation import generate_replies

    processor, model = loaded(family)
    prompts = [
        [_turn("user", _image(), "Read this receipt.")],
        [_turn("user", _image((0, 0, 255), (40, 70)), "What colour is it, in a word?")],
    ]
    replies = generate_replies(model, processor, prompts, max_new_tokens=4, batch_size=2)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    # The batch gives what each prompt gives alone: padding must not leak into the reply.
    alone = [generate_replies(model, processor, [p], max_new_tokens=4)[0] for p in prompts]
    assert replies == alone
