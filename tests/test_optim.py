"""Optimizer parameter groups: optimizer.param_groups entries pick parameters by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automodel.errors import UsageError
from automodel.recipes.vlm.config import resolve_config
from automodel.training.optim import build_optimizer, param_groups

ADAMW = {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.01}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Linear(4, 4)
        self.multi_modal_projector = nn.Linear(4, 4)
        self.language_model = nn.Linear(4, 4)


def _names(model: nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_groups_take_their_options_and_the_rest_keeps_the_defaults():
    model = Toy()
    specs = [
        {"match": "vision_tower", "lr": 1e-4},
        {"match": r"projector\.weight", "lr": 5e-3, "weight_decay": 0.0, "betas": [0.8, 0.9]},
    ]
    opt = build_optimizer({**ADAMW, "param_groups": specs}, model)
    rest, tower, proj = opt.param_groups
    assert _names(model, tower["params"]) == {"vision_tower.weight", "vision_tower.bias"}
    assert _names(model, proj["params"]) == {"multi_modal_projector.weight"}
    assert _names(model, rest["params"]) == {
        "multi_modal_projector.bias",
        "language_model.weight",
        "language_model.bias",
    }
    assert (rest["lr"], tower["lr"], proj["lr"]) == (1e-3, 1e-4, 5e-3)
    assert proj["weight_decay"] == 0.0 and proj["betas"] == (0.8, 0.9)
    assert tower["weight_decay"] == 0.01


def test_adam_runs_fused_unless_the_config_chooses():
    model = Toy()
    assert build_optimizer(ADAMW, model).defaults["fused"] is True
    assert not build_optimizer({**ADAMW, "foreach": True}, model).defaults["fused"]
    assert build_optimizer({**ADAMW, "fused": False}, model).defaults["fused"] is False
    sgd = build_optimizer({"_target_": "torch.optim.SGD", "lr": 0.1}, model)
    assert not sgd.defaults.get("fused")
    # The same update as the unfused loop, to rounding.
    fused, loop = Toy(), Toy()
    loop.load_state_dict(fused.state_dict())
    steps = [build_optimizer(ADAMW, fused), build_optimizer({**ADAMW, "fused": False}, loop)]
    for m, opt in zip((fused, loop), steps, strict=True):
        for _ in range(3):
            m.language_model(torch.ones(2, 4)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(fused.parameters(), loop.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_first_match_wins_and_frozen_parameters_are_left_out():
    model = Toy()
    model.language_model.requires_grad_(False)
    groups = param_groups(model, [{"match": "weight", "lr": 1.0}, {"match": "bias", "lr": 2.0}])
    assert [_names(model, g["params"]) for g in groups] == [
        {"vision_tower.weight", "multi_modal_projector.weight"},
        {"vision_tower.bias", "multi_modal_projector.bias"},
    ]
    assert _names(model, param_groups(model, None)) == {
        "vision_tower.weight",
        "vision_tower.bias",
        "multi_modal_projector.weight",
        "multi_modal_projector.bias",
    }


@pytest.mark.parametrize(
    "specs, message",
    [
        ([{"match": "vision_towr", "lr": 1e-4}], "param_groups[0].match='vision_towr' matches no"),
        ([{"match": "language_model"}], "matches no trainable parameter"),
        ([{"match": "tower"}, {"match": "vision", "lr": 1.0}], "param_groups[1].match"),
        ([{"lr": 1e-4}], "param_groups[0] needs a match"),
        ([{"match": "("}], "is not a valid regex"),
        ([{"match": "tower", "lrr": 1e-4}], "param_groups[0].lrr"),
    ],
)
def test_bad_group_specs_name_the_entry(specs, message):
    model = Toy()
    model.language_model.requires_grad_(False)
    with pytest.raises(UsageError) as err:
        build_optimizer({**ADAMW, "param_groups": specs}, model)
    assert str(err.value).startswith("optimizer.param_groups[") and message in str(err.value)


def test_config_accepts_param_groups_and_rejects_a_non_list():
    base = {"model": {"_target_": "transformers.AutoModel.from_pretrained"}}
    base["dataset"] = {"_target_": "automodel.datasets.vlm.make_cord_v2_dataset"}
    groups = [{"match": "vision_tower", "lr": 1e-4}]
    cfg, _ = resolve_config({**base, "optimizer": {**ADAMW, "param_groups": groups}})
    assert cfg["optimizer"]["param_groups"] == groups
    with pytest.raises(UsageError, match="optimizer.param_groups="):
        resolve_config({**base, "optimizer": {**ADAMW, "param_groups": "vision_tower"}})


def test_scheduler_scales_every_group_alike():
    from automodel.config.sections import LrSchedulerConfig
    from automodel.training.schedule import build_lr_scheduler

    model = Toy()
    opt = build_optimizer({**ADAMW, "param_groups": [{"match": "vision", "lr": 1e-4}]}, model)
    sched = build_lr_scheduler(opt, 10, LrSchedulerConfig(lr_decay_style="linear"))
    for _ in range(5):
        opt.step()
        sched.step()
    rest, tower = (g["lr"] for g in opt.param_groups)
    assert rest == pytest.approx(5e-4) and tower == pytest.approx(5e-5)
    assert isinstance(opt, torch.optim.AdamW)


def test_the_recipe_trains_with_param_groups(tmp_path, tiny_gemma3, receipts):
    """Through the CLI: the tower's group runs at its own rate (printed in the resolved config)."""
    from tests.conftest import ROOT, run_cli

    def finetune(pattern: str, out: str):
        return run_cli(
            "finetune",
            "vlm",
            "-c",
            ROOT / "examples/vlm/quickstart.yaml",
            "~prepare",
            f"--model.pretrained_model_name_or_path={tiny_gemma3}",
            f"--dataset.path_or_dataset={receipts}",
            "~validation_dataset",
            "--freeze_config.freeze_vision_tower=false",
            f"--optimizer.param_groups=[{{match: {pattern}, lr: 1.0e-4}}]",
            "--step_scheduler.max_steps=1",
            "--step_scheduler.global_batch_size=2",
            "--step_scheduler.local_batch_size=2",
            "--step_scheduler.eval_every_steps=null",
            "--dataloader.num_workers=0",
            "--preview.num_samples=0",
            f"--checkpoint.checkpoint_dir={tmp_path / out}",
            cwd=tmp_path,
        )

    result = finetune("vision_tower", "checkpoints")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "match: vision_tower" in result.stdout and "step 1/1" in result.stdout

    bad = finetune("visual_tower", "bad")
    assert bad.returncode == 2
    assert "optimizer.param_groups[0].match='visual_tower' matches no trainable" in bad.stderr
