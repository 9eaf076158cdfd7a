"""The family registry (``automodel.models.families``): every twin family has an entry whose facts
hold on the twin, the registry agrees with attribute probing (the fallback for an unregistered
family, which prints a one-line notice), and no other runtime module names a family.

The checklist in docs/families.md names these tests (and tests/test_families.py and
tests/test_packing.py). The twins are built once per session (``tiny_family`` in conftest.py);
the whole file takes about 20 seconds on 2 cores.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import re
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from automodel.datasets.collate import default_collate_fn, image_token_ids
from automodel.datasets.samplers import image_tokens_per_image
from automodel.distributed.parallelize import vision_tower
from automodel.models import families
from automodel.models.families import FAMILIES, family_of, probed_family
from automodel.models.freeze import (
    embedding_modules,
    language_modules,
    projector_modules,
    vision_modules,
)
from automodel.peft.lora import LoraConfig, resolve_target_modules
from tests.conftest import ROOT, labelled_spans

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = ROOT / "automodel"
# Fixture and demo code builds twins of the families on purpose; the registry is the one runtime
# module that names them.
NOT_SCANNED = (
    "models/families.py",
    "twins/",
    "demo/",
)


def twin_families() -> list[str]:
    """The names of the tiny twins (the one place this test reads the twins' builder table)."""
    from automodel.twins import TWIN_FAMILIES as BUILDERS

    return list(BUILDERS)


@pytest.fixture(scope="module")
def loaded(tiny_family):
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = tiny_family(name)
            cache[name] = (
                AutoProcessor.from_pretrained(path),
                AutoModelForImageTextToText.from_pretrained(path),
            )
        return cache[name]

    return get


@contextlib.contextmanager
def unregistered(model_type: str):
    """The registry without ``model_type`` for the duration of the block."""
    entry = FAMILIES.pop(model_type)
    try:
        yield entry
    finally:
        FAMILIES[model_type] = entry


def _names(model, modules) -> list[str]:
    by_id = {id(m): n for n, m in model.named_modules()}
    return [by_id[id(m)] for m in modules]


def _roles(model, processor) -> dict:
    """Everything the consumers read from the registry, as they read it."""
    return {
        "vision": _names(model, vision_modules(model)),
        "projector": _names(model, projector_modules(model)),
        "language": _names(model, language_modules(model)),
        "embeddings": _names(model, embedding_modules(model)),
        "lora": resolve_target_modules(model, LoraConfig()),
        "lora_all": resolve_target_modules(model, LoraConfig(match_all_linear=True)),
        "image_tokens": image_token_ids(processor),
        "tokens_per_image": image_tokens_per_image(processor),
        "config_image_token": families.image_token_id(model),
        "sharded_tower": _names(model, [vision_tower(model)]),
        "cached_tower": family_of(model).cached_tower,
        "rope_inputs": set(families.rope_index(model)[1]) - {"kwargs"},
    }


# ------------------------------------------------------------------------ every twin family
@pytest.mark.parametrize("name", twin_families())
def test_every_twin_family_has_an_entry_whose_parts_resolve(name, loaded):
    """The twin's ``model_type`` is registered; its module paths resolve; tower, projector and
    language model (with its head) hold every parameter once; the embeddings are the model's
    input embeddings; the stop tokens are single tokens the twin's generation stops at."""
    processor, model = loaded(name)
    family = family_of(model)
    assert family.registered and family.model_type == model.config.model_type
    for path in family.tower + family.projector + family.decoder + (family.embeddings,):
        model.get_submodule(path)
    assert embedding_modules(model) == [model.get_input_embeddings()]

    def params(modules) -> set[int]:
        return {id(p) for m in modules for p in m.parameters()}

    tower, projector = params(vision_modules(model)), params(projector_modules(model))
    language = params(language_modules(model))
    assert not (tower & projector or tower & language or projector & language)
    assert tower | projector | language == params([model])

    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    assert family.stop_tokens
    for token in family.stop_tokens:
        assert tokenizer.tokenize(token) == [token], token
        assert tokenizer.convert_tokens_to_ids(token) in (eos if isinstance(eos, list) else [eos])


@pytest.mark.parametrize("name", twin_families())
def test_the_registry_agrees_with_probing_on_every_twin(name, loaded, capsys):
    """Without its entry, the family's parts, LoRA targets, image tokens, positions and cached
    tower are found by attribute names, and they are the registry's."""
    processor, model = loaded(name)
    registered = _roles(model, processor)
    assert registered["vision"] and registered["projector"] and registered["image_tokens"]
    with unregistered(model.config.model_type):
        assert not family_of(model).registered
        probed = _roles(model, processor)
    assert probed == registered
    # Packing's facts have no probe: the registry's entry decides them.
    family = FAMILIES[model.config.model_type]
    assert (family.rope_index is not None) == bool(registered["rope_inputs"])


def test_an_unregistered_family_is_probed_with_a_one_line_notice(loaded, capsys):
    _, model = loaded("gemma3")
    renamed = copy.deepcopy(model.config)
    renamed.model_type = "gemma3_not_registered"
    original, model.config = model.config, renamed
    try:
        capsys.readouterr()
        first, second = family_of(model), family_of(model)
        assert first == second == probed_family(model)
    finally:
        model.config = original
    notice = capsys.readouterr().err.splitlines()
    assert notice == [
        (
            "model_type 'gemma3_not_registered' is not in automodel's family registry; "
            "finding its parts by attribute names (see docs/families.md)"
        )
    ]
    assert not first.registered and first.model_type == "gemma3_not_registered"
    assert first.tower == FAMILIES["gemma3"].tower
    assert first.projector == FAMILIES["gemma3"].projector


def test_the_collate_applies_a_family_template_fixup(loaded, monkeypatch):
    """``template_fixup`` reaches the collate: a fix-up that ends replies with ``<eos>`` instead
    of ``<end_of_turn>`` moves the labelled end token."""
    processor, _ = loaded("gemma3")
    entry = FAMILIES["gemma3"]
    assert entry.template_fixup is None
    fixed = dataclasses.replace(entry, template_fixup=lambda t: t.replace("<end_of_turn>", "<eos>"))
    monkeypatch.setitem(FAMILIES, "gemma3", fixed)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (60, 40))},
                {"type": "text", "text": "Colour?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Black"}]},
    ]
    batch = default_collate_fn([{"conversation": conversation}], processor)
    assert labelled_spans(batch["labels"][0], processor.tokenizer) == ["Black<eos>"]


# ------------------------------------------------------------------------ no family elsewhere
def forbidden_names() -> set[str]:
    """Family names and every family-specific attribute name the registry holds or probes for.

    ``model`` (where every transformers ``*ForConditionalGeneration`` keeps its base model) and
    the batch keys a position-id method takes (the processor's outputs, which the collate handles
    without knowing the family) are not family-specific.
    """
    names = set(FAMILIES) | set(families.PROBED_NAMES)
    for family in FAMILIES.values():
        paths = family.tower + family.projector + family.decoder + (family.embeddings or "",)
        names |= {part for path in paths for part in path.split(".") if part}
        names |= set(family.image_token_attrs) | set(family.tokens_per_image_attrs)
        names |= {family.config_image_token, family.rope_index}
    return names - {"model", None, ""}


def stop_tokens() -> set[str]:
    return {token for family in FAMILIES.values() for token in family.stop_tokens}


def family_mentions(path: Path, names: set[str], tokens: set[str]) -> list[str]:
    """Where ``path``'s code names a family or a family attribute.

    Counted: attribute accesses (``model.visual``), keyword names, and the words of string
    constants (``getattr(m, "vision_tower")``, ``{"gemma3": ...}``, f-string text), matched as
    whole words so that ``freeze_vision_tower`` is not ``vision_tower``; string constants that
    contain a stop token. Not counted: docstrings and comments, which may name families to
    explain, and identifiers of the code's own variables and functions.
    """
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        words: list[str] = []
        if isinstance(node, ast.Attribute):
            words = [node.attr]
        elif isinstance(node, ast.keyword) and node.arg:
            words = [node.arg]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings:
                continue
            words = re.findall(r"\w+", node.value)
            words += [t for t in tokens if t in node.value]
        for word in words:
            if word in names or word in tokens:
                found.append(f"{path}:{node.lineno}: {word}")
    return found


def runtime_modules() -> list[Path]:
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if not str(path.relative_to(PACKAGE)).startswith(NOT_SCANNED)
    ]


def test_no_module_outside_the_registry_names_a_family():
    names, tokens = forbidden_names(), stop_tokens()
    assert {"gemma3", "qwen2_vl", "vision_tower", "visual", "connector"} <= names
    found = [m for path in runtime_modules() for m in family_mentions(path, names, tokens)]
    assert found == [], "\n".join(found)


def test_the_scan_sees_a_family_name(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Gemma 3 keeps its tower at vision_tower."""\n'
        "freeze_vision_tower = True\n"
        "tower = model.model.vision_tower\n"
        "kind = {'qwen2_vl': 1}\n"
        "end = f'reply<end_of_turn>{x}'\n"
    )
    found = family_mentions(sample, forbidden_names(), stop_tokens())
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        "<end_of_turn>",
        "qwen2_vl",
        "vision_tower",
    ]


def test_module_paths_are_plain_attribute_paths():
    for family in FAMILIES.values():
        for path in family.tower + family.projector + family.decoder + (family.embeddings,):
            assert re.fullmatch(r"\w+(\.\w+)*", path), (family.model_type, path)
        assert family.bidirectional in (None, "image", "prefix")
