"""Config loading, overrides, interpolation, instantiation and their errors."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from automodel.config.compat import translate_seed_layout
from automodel.config.instantiate import instantiate, resolve_target
from automodel.config.loader import apply_overrides, interpolate_env, load_yaml, parse_overrides
from automodel.config.sections import DataCheckConfig, PrecisionConfig, VisionCacheConfig
from automodel.errors import UsageError
from automodel.recipes.vlm.config import SCHEMA, FinetuneConfig, resolve_config
from automodel.recipes.vlm.reference import COMMAND, reference
from tests.conftest import ROOT, run_cli

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


# One bad value per plain section (and the enumerated kwargs of _target_ sections): each is
# refused by resolve_config, before anything loads, naming the key, the value and the choices.
BAD_VALUES = [
    (
        "step_scheduler.global_batch_size",
        0,
        "step_scheduler.global_batch_size: 0 must be at least 1",
    ),
    (
        "step_scheduler.val_batches",
        "all",
        "step_scheduler.val_batches='all' should be an integer or null",
    ),
    (
        "lr_scheduler.lr_decay_style",
        "cosin",
        "lr_scheduler.lr_decay_style: 'cosin' is not one of cosine, linear, constant",
    ),
    ("lr_scheduler.lr_warmup_steps", -1, "lr_scheduler.lr_warmup_steps: -1 must be at least 0"),
    (
        "freeze_config.freeze_projector",
        "yes",
        "freeze_config.freeze_projector='yes' should be true or false",
    ),
    ("clip_grad_norm.max_norm", -1.0, "clip_grad_norm.max_norm: -1.0 must be at least 0"),
    (
        "precision.autocast",
        "bf61",
        "precision.autocast: 'bf61' is not one of auto, bf16, fp16, none",
    ),
    ("checkpoint.keep_last_n", 0, "checkpoint.keep_last_n: 0 must be at least 1"),
    ("distributed.tp_size", 2, "distributed.tp_size: 2 must be 1"),
    ("distributed.cp_size", 4, "distributed.cp_size: 4 must be 1"),
    ("distributed.strategy", "fsdp", "distributed.strategy: 'fsdp' is not one of none, ddp, fsdp2"),
    ("distributed.sequence_parallel", True, "distributed.sequence_parallel: true is not false"),
    (
        "distributed.dp_size",
        "all",
        "distributed.dp_size: 'all' is not a positive integer, null or none",
    ),
    (
        "distributed.param_dtype",
        "bf32",
        (
            "distributed.param_dtype: 'bf32' is not one of bfloat16, float16, float32, bf16, fp16, "
            "fp32, torch.bfloat16, torch.float16, torch.float32 or null"
        ),
    ),
    ("dist_env.timeout_minutes", 0, "dist_env.timeout_minutes: 0 must be at least 1"),
    ("vision_cache.max_images", -1, "vision_cache.max_images: -1 must be at least 0"),
    ("vision_cache.storage", "ssd", "vision_cache.storage: 'ssd' is not one of memory, disk"),
    (
        "compile.mode",
        "fast",
        (
            "compile.mode: 'fast' is not one of default, reduce-overhead, max-autotune, "
            "max-autotune-no-cudagraphs or null"
        ),
    ),
    ("packing.pack_length", 0, "packing.pack_length: 0 must be at least 1"),
    (
        "data_check.on_bad_sample",
        "ignore",
        "data_check.on_bad_sample: 'ignore' is not one of error, skip",
    ),
    (
        "data_check.max_bad_fraction",
        1.5,
        "data_check.max_bad_fraction: 1.5 must be between 0 and 1",
    ),
    ("eval.batch_size", 0, "eval.batch_size: 0 must be at least 1"),
    ("eval.metrics", ["f1"], "eval.metrics: unknown metric 'f1'"),
    ("preview.num_samples", -1, "preview.num_samples: -1 must be at least 0"),
    ("wandb.project", 3, "wandb.project=3 should be a string or null"),
    ("mlflow.tags", ["a"], "mlflow.tags=['a'] should be a section of keys or null"),
    (
        "dataloader.collate_fn.on_overlength",
        "truncate",
        "dataloader.collate_fn.on_overlength: 'truncate' is not one of drop, error",
    ),
    ("dataset.target_format", "xml", "dataset.target_format: 'xml' is not one of json, donut"),
    ("precision.autocats", "bf16", "unknown key precision.autocats (did you mean: autocast?)"),
]


def _set(cfg: dict, dotted: str, value) -> dict:
    *path, key = dotted.split(".")
    node = cfg
    for part in path:
        node = node.setdefault(part, {})
    node[key] = value
    return cfg


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[k for k, _, _ in BAD_VALUES])
def test_a_bad_value_names_the_key_the_value_and_the_choices(key, value, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve_config(_set(load_yaml(NEMO_YAML), key, value))


def test_every_plain_section_has_a_bad_value_test():
    tested = {key.split(".")[0] for key, _, _ in BAD_VALUES}
    assert set(SCHEMA.plain) <= tested


def test_sections_check_their_values_when_built_directly():
    with pytest.raises(UsageError, match="precision.autocast: 'bf61' is not one of"):
        PrecisionConfig(autocast="bf61")
    with pytest.raises(UsageError, match=r"unknown key data_check.on_bad \(did you mean"):
        DataCheckConfig.from_dict({"on_bad": "skip"})
    assert DataCheckConfig.from_dict({"on_bad_sample": "skip"}).max_bad_fraction == 0.1


def test_a_disk_vision_cache_needs_a_folder_it_can_write(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (None, "vision_cache.storage=disk needs vision_cache.path, the folder it writes to"),
        ("", "vision_cache.storage=disk needs vision_cache.path"),
        (str(a_file), f"vision_cache.path: {a_file} is a file, not a folder"),
        (str(a_file / "below"), f"cannot be written ({a_file} is not writable)"),
    ]
    for path, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            VisionCacheConfig(enabled=True, storage="disk", path=path)
    VisionCacheConfig(enabled=True, storage="disk", path=str(tmp_path / "new" / "folder"))
    assert not (tmp_path / "new").exists()  # checked, not created
    VisionCacheConfig(enabled=False, storage="disk", path="")  # off: not checked


def test_defaults_come_from_the_dataclasses_and_are_saved_in_the_resolved_config():
    resolved, _ = resolve_config(load_yaml(NEMO_YAML))
    for name, section in SCHEMA.plain.items():
        if section.optional:
            assert name not in resolved  # a wandb / mlflow section turns its logger on
            continue
        assert set(resolved[name]) == {f.name for f in dataclasses.fields(section)}, name
    assert resolved["precision"] == PrecisionConfig().to_dict()
    typed = FinetuneConfig.from_config(resolved)
    assert typed.distributed.tp_size == 1 and typed.distributed.num_dp_ranks is None
    assert typed.wandb is None
    assert resolve_config(resolved)[0] == resolved, "resolving twice changes nothing"


def test_every_field_has_a_description():
    for section in SCHEMA.plain.values():
        assert section.__doc__, section
        for f in dataclasses.fields(section):
            assert f.metadata["doc"], f"{section.section}.{f.name}"


def test_config_reference_matches_the_dataclasses():
    committed = (ROOT / "docs/config.md").read_text()
    assert committed == reference(), f"docs/config.md is stale: run {COMMAND}"


@pytest.mark.parametrize(
    "path", sorted(ROOT.glob("examples/**/*.yaml")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_shipped_example_validates(path):
    resolved, _ = resolve_config(load_yaml(path))
    FinetuneConfig.from_config(resolved)


@pytest.mark.parametrize(
    "command, override, message",
    [
        (
            ["validate"],
            ["--precision.autocast", "bf61"],
            "precision.autocast: 'bf61' is not one of auto, bf16, fp16, none",
        ),
        (
            ["finetune", "vlm"],
            ["--dataloader.collate_fn.on_overlength", "truncate"],
            "dataloader.collate_fn.on_overlength: 'truncate' is not one of drop, error",
        ),
    ],
)
def test_the_cli_refuses_a_bad_value_with_exit_code_2(tmp_path, command, override, message):
    result = run_cli(*command, "-c", NEMO_YAML, *override, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "checkpoints").exists(), "nothing may start before the config is valid"


def test_the_tracked_score_must_be_one_the_named_metrics_produce():
    cfg = _set(load_yaml(NEMO_YAML), "eval", {"metrics": ["vqa"], "best_metric": "bleu4"})
    with pytest.raises(UsageError, match="eval.best_metric: 'bleu4' is not one of exact_match"):
        resolve_config(cfg)


def test_vision_loss_with_packing_is_refused_before_anything_loads():
    cfg = _set(load_yaml(NEMO_YAML), "vision_loss", {"weight": 0.5})
    cfg = _set(cfg, "packing", {"enabled": True})
    with pytest.raises(UsageError, match="vision_loss.weight > 0 with packing.enabled=true"):
        resolve_config(cfg)
    resolve_config(_set(cfg, "packing", {"enabled": False}))  # either alone is fine


VLM_RECIPES = [
    "FinetuneRecipeForVLM",
    "nemo_automodel.recipes.vlm.finetune.FinetuneRecipeForVLM",
    "automodel.recipes.vlm.finetune.FinetuneRecipeForVLM",
    {"_target_": "nemo_automodel.recipes.vlm.finetune.FinetuneRecipeForVLM"},
]


@pytest.mark.parametrize("recipe", VLM_RECIPES, ids=str)
def test_recipe_names_the_vlm_recipe_in_each_of_nemos_forms(recipe):
    resolved, _ = resolve_config({**load_yaml(NEMO_YAML), "recipe": recipe})
    assert resolved["recipe"] == recipe


@pytest.mark.parametrize(
    "recipe",
    [
        "TrainFinetuneRecipeForNextTokenPrediction",
        "nemo_automodel.recipes.llm.train_ft.TrainFinetuneRecipeForNextTokenPrediction",
        {"_target_": "nemo_automodel.recipes.vlm.kd.KnowledgeDistillationRecipeForVLM"},
        {"_target_": "FinetuneRecipeForVLM", "seed": 1},
        7,
    ],
    ids=str,
)
def test_another_recipe_is_refused_in_one_line_saying_what_runs(recipe):
    with pytest.raises(UsageError) as error:
        resolve_config({**load_yaml(NEMO_YAML), "recipe": recipe, "model": {}})
    message = str(error.value)
    assert message.startswith(f"recipe: {recipe!r} is not a recipe automodel runs")
    assert "runs one, FinetuneRecipeForVLM" in message and "\n" not in message


def test_the_short_form_runs_the_recipe_the_config_names(tmp_path, capsys):
    from automodel.cli import main, short_form

    body = NEMO_YAML.read_text().replace("recipe: FinetuneRecipeForVLM\n", "")
    (tmp_path / "none.yaml").write_text(body)
    (tmp_path / "llm.yaml").write_text("recipe: TrainFinetuneRecipeForNextTokenPrediction\n" + body)
    for args in (["none.yaml"], ["-c", "none.yaml", "--step_scheduler.max_steps=2"]):
        assert main([str(tmp_path / a) if a.endswith("yaml") else a for a in args]) == 2
        error = capsys.readouterr().err.strip()
        assert error == (
            f"error: {tmp_path / 'none.yaml'} names no recipe; add the line 'recipe: "
            f"FinetuneRecipeForVLM' at its top, or run: automodel finetune vlm -c "
            f"{tmp_path / 'none.yaml'}"
        )
    for args in (["-c"], ["finetune", "vlm", "-c"], ["validate", "-c"], ["data", "check", "-c"]):
        assert main([*args, str(tmp_path / "llm.yaml")]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "runs one, FinetuneRecipeForVLM" in lines[0], lines
    for first in ([str(NEMO_YAML)], ["-c", str(NEMO_YAML)], [f"--config={NEMO_YAML}"]):
        assert short_form([*first, "--nproc-per-node", "2"]) == [
            "finetune", "vlm", "-c", str(NEMO_YAML), "--nproc-per-node", "2",
        ]  # fmt: skip
    assert short_form(["validate", "-c", str(NEMO_YAML)]) is None
