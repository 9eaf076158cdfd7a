"""Config loading, overrides, interpolation, instantiation and their errors."""

from __future__ import annotations

import pytest
import torch

from automodel.config.compat import translate_seed_layout
from automodel.config.instantiate import instantiate, resolve_target
from automodel.config.loader import apply_overrides, interpolate_env, load_yaml, parse_overrides
from automodel.errors import UsageError
from automodel.recipes.vlm.config import resolve_config
from tests.conftest import ROOT

SEED_YAML = ROOT / "examples/vlm/gemma_3_vl_2b_cord_v2.yaml"
NEMO_YAML = ROOT / "examples/vlm/gemma3_vl_4b_cord_v2.yaml"


def test_yaml_reads_exponent_floats():
    cfg = load_yaml(SEED_YAML)
    assert cfg["optimizer"]["lr"] == 1e-5 and isinstance(cfg["optimizer"]["lr"], float)


def test_override_forms_and_delete():
    cfg = {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    ovs = parse_overrides(["--a.b=2", "--a.c", "y", "~d", "--e.f", "true"])
    out = apply_overrides(cfg, ovs)
    assert out == {"a": {"b": 2, "c": "y"}, "e": {"f": True}}
    assert cfg == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}, "the caller's config must not change"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--a.b"], "has no value"),
        (["a.b=1"], "unexpected argument"),
        (["~a.zz"], "no key a.zz"),
        (["--a.b=hello"], "expects a number"),
        (["--a.b.c=1"], "not a section"),
    ],
)
def test_override_errors(args, message):
    with pytest.raises(UsageError, match=message):
        apply_overrides({"a": {"b": 1}}, parse_overrides(args))


def test_env_interpolation(monkeypatch):
    monkeypatch.setenv("STEPS", "12")
    cfg = {"s": {"n": "${STEPS}", "p": "${HOME_X,/tmp}/out", "d": "${MISSING,3}"}}
    assert interpolate_env(cfg) == {"s": {"n": 12, "p": "/tmp/out", "d": 3}}
    with pytest.raises(UsageError, match="MISSING_VAR is not set"):
        interpolate_env({"x": "${MISSING_VAR}"})


def test_instantiate_nested_and_call_site_kwargs_win():
    node = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3, "bias": False}
    layer = instantiate(node, out_features=4)
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 4 and layer.bias is None
    seq = instantiate({"_target_": "torch.nn.Sequential"}, instantiate(node))
    assert isinstance(seq[0], torch.nn.Linear)


def test_target_allowlist_and_aliases():
    with pytest.raises(UsageError, match="outside the allowed modules"):
        resolve_target("os.system", "model")
    with pytest.raises(UsageError, match="has no attribute 'Linearr'.*Linear"):
        resolve_target("torch.nn.Linearr", "model")
    fn = resolve_target("nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy", "loss_fn")
    assert fn.__module__ == "automodel.loss.masked_ce"
    assert resolve_target("os.getcwd", "x", extra_prefixes=("os.",))() is not None


def test_seed_layout_translation():
    cfg = translate_seed_layout(load_yaml(SEED_YAML))
    assert "data" not in cfg
    assert cfg["dataset"]["image_size"] == 448
    assert cfg["step_scheduler"] == {"local_batch_size": 2, "global_batch_size": 2}
    assert cfg["dataloader"]["collate_fn"]["max_length"] == 512


def test_resolve_config_accepts_the_shipped_examples():
    for path in (SEED_YAML, NEMO_YAML, ROOT / "examples/vlm/quickstart.yaml"):
        resolved, _ = resolve_config(load_yaml(path))
        assert resolved["model"]["_target_"]
    nemo, _ = resolve_config(load_yaml(NEMO_YAML))
    assert nemo["distributed"]["strategy"] == "fsdp2" and nemo["dist_env"]["backend"] == "nccl"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--step_scheduler.max_step=3", "unknown key step_scheduler.max_step.*max_steps"),
        ("--step_schedular.max_steps=3", "unknown config section 'step_schedular'.*step_scheduler"),
        ("--step_scheduler.max_steps=three", "step_scheduler.max_steps expects a number"),
        ("--step_scheduler.log_every_steps=three", "log_every_steps='three' should be an integer"),
        ("--optimizer.lrr=0.1", "optimizer.lrr.*did you mean: lr"),
        ("--model._target_=os.system", "outside the allowed modules"),
        ("--dataloader.collate_fn.max_lenght=9", "max_lenght.*max_length"),
    ],
)
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(UsageError, match=message):
        resolve_config(apply_overrides(load_yaml(NEMO_YAML), parse_overrides([override])))


def test_validation_dataloader_without_target_gets_the_default_loader():
    cfg = load_yaml(NEMO_YAML)
    cfg["validation_dataloader"] = {"batch_size": 2, "num_workers": 0}
    resolved, _ = resolve_config(cfg)
    assert resolved["validation_dataloader"]["_target_"] == resolved["dataloader"]["_target_"]
    assert resolved["validation_dataloader"]["num_workers"] == 0
