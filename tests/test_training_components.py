"""The pieces behind long runs, tested in-process: checkpoints, state, guards, logs, the picture."""

from __future__ import annotations

import io
import json
import random
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from automodel.errors import RunStopped, UsageError
from automodel.training import checkpoint
from automodel.training.checkpoint import (
    CheckpointManager,
    OptimizerState,
    load_model_weights,
    read_meta,
)
from automodel.training.guards import NonFiniteGuard
from automodel.training.loggers import build_sinks, check_installed
from automodel.training.metrics import MetricsLogger, ProgressBar, read_jsonl, truncate_log
from automodel.training.plot import plot_losses
from automodel.training.rng import StatefulRNG
from automodel.training.state import load_train_state, save_train_state


class TiedModel(torch.nn.Module):
    """Two names for one tensor, as Gemma 3's lm_head and embeddings."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    rng = StatefulRNG(seed=3)
    random.random(), np.random.rand(), torch.rand(1)
    save_train_state({"rng": rng.state_dict()}, tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    rng.load_state_dict(load_train_state(tmp_path)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_a_foreign_pickle_is_refused(tmp_path):
    torch.save({"x": types.SimpleNamespace(a=1)}, tmp_path / "train_state.pt")
    with pytest.raises(UsageError, match="cannot read the training state"):
        load_train_state(tmp_path)


def test_checkpoints_pointers_and_pruning(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last_n=2)
    model = TiedModel()
    for step, val_loss in [(1, 3.0), (2, None), (3, 1.0), (4, 2.0), (5, None)]:
        manager.save(step, model, {"step": step}, {"a": 1}, val_loss)
    assert (tmp_path / "LATEST").read_text().strip() == "step_000005"
    assert (tmp_path / "LOWEST_VAL").read_text().strip() == "step_000003"
    # The newest two and the lowest validation loss stay.
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_000003",
        "step_000004",
        "step_000005",
    ]
    meta = read_meta(tmp_path / "step_000003")
    assert {k: meta[k] for k in ("step", "val_loss", "world_size")} == {
        "step": 3,
        "val_loss": 1.0,
        "world_size": 1,
    }
    assert set(meta["files"]) == {"model.safetensors", "train_state.pt", "config.yaml"}
    assert manager.find_resume() == tmp_path / "step_000005"
    # LATEST lost (a crash right after the rename): the newest complete folder still resumes.
    (tmp_path / "LATEST").unlink()
    (tmp_path / "step_000009.tmp").mkdir()
    assert manager.find_resume() == tmp_path / "step_000005"
    assert CheckpointManager(tmp_path, enabled=False).find_resume() is None
    with pytest.raises(UsageError, match="keep_last_n=0"):
        CheckpointManager(tmp_path, keep_last_n=0)


class Killed(BaseException):
    """A SIGKILL, for the code under test: nothing catches it."""


def test_a_save_killed_after_its_rename_is_finished_by_the_rerun(tmp_path, monkeypatch):
    """Killed between the step folder's rename and ``LATEST``: the rerun resumes from the new
    folder, which it never saves again, so it first does what that save had left: ``LATEST``,
    ``LOWEST_VAL`` (the new folder has the lowest validation loss) and pruning."""
    manager = CheckpointManager(tmp_path, keep_last_n=1)
    model = TiedModel()
    manager.save(3, model, {}, {}, val_loss=2.0)
    write_atomic = checkpoint._write_atomic

    def killed_at_latest(path, text):
        if path.name == "LATEST":
            raise Killed
        write_atomic(path, text)

    monkeypatch.setattr(checkpoint, "_write_atomic", killed_at_latest)
    with pytest.raises(Killed):
        manager.save(6, model, {}, {}, val_loss=1.0)
    monkeypatch.undo()
    assert (tmp_path / "LATEST").read_text() == "step_000003\n"

    rerun = CheckpointManager(tmp_path, keep_last_n=1)
    assert rerun.find_resume() == tmp_path / "step_000006"
    assert (tmp_path / "LATEST").read_text() == "step_000006\n"
    assert (tmp_path / "LOWEST_VAL").read_text() == "step_000006\n"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000006"]


def test_weights_load_strictly_with_tied_tensors(tmp_path):
    source, target = TiedModel(), TiedModel()
    CheckpointManager(tmp_path).save(1, source, {}, {})
    load_model_weights(target, tmp_path / "step_000001")
    assert torch.equal(target.embed.weight, source.embed.weight)
    assert target.head.weight is target.embed.weight

    class Other(TiedModel):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(UsageError, match="does not match this model"):
        load_model_weights(Other(), tmp_path / "step_000001")


def test_optimizer_state_restores_a_parameter_that_never_had_a_gradient(tmp_path):
    """As LLaVA's last tower layer, which the model never reads: AdamW keeps no state for it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    optimizer = torch.optim.AdamW(model.parameters())
    model[0](torch.ones(1, 3)).sum().backward()  # model[1] gets no gradient
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # as after every training step
    save_train_state({"optimizer": OptimizerState(model, optimizer).state_dict()}, tmp_path)

    fresh = torch.optim.AdamW(model.parameters())
    OptimizerState(model, fresh).load_state_dict(load_train_state(tmp_path, 0)["optimizer"])
    restored = fresh.state_dict()["state"]
    for index, state in optimizer.state_dict()["state"].items():  # model[0]'s weight and bias
        assert torch.equal(restored[index]["exp_avg"], state["exp_avg"])


def test_a_failed_save_leaves_latest_alone(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    model = TiedModel()
    manager.save(1, model, {}, {})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("automodel.training.checkpoint.save_file", disk_full)
    with pytest.raises(RunStopped, match="No space left on device.*LATEST still names step_000001"):
        manager.save(2, model, {}, {})
    assert (tmp_path / "LATEST").read_text().strip() == "step_000001"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [
        "step_000001"
    ]


def test_guard_skips_and_counts_non_finite_steps():
    guard = NonFiniteGuard(max_consecutive=2)
    one, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert guard.check(one, one)
    assert not guard.check(nan, one) and not guard.exhausted
    assert guard.check(one, one) and guard.consecutive == 0
    assert not guard.check(one, inf) and not guard.check(nan, nan)
    assert guard.exhausted and guard.skipped_steps == 3
    restored = NonFiniteGuard(2)
    restored.load_state_dict(guard.state_dict())
    assert restored.exhausted and restored.skipped_steps == 3


def test_truncate_log_keeps_steps_up_to_the_resumed_one(tmp_path):
    path = tmp_path / "training.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo'
    )
    truncate_log(path, 4)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    truncate_log(path, 0)
    assert not path.exists()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    terminal = FakeTerminal()
    bar = ProgressBar(total=10, initial=4, stream=terminal)
    bar.update()
    bar.write("step 5/10 | loss 1.0")
    bar.close()
    assert "5/10" in terminal.getvalue() and "step 5/10 | loss 1.0" in terminal.getvalue()
    plain = io.StringIO()
    bar = ProgressBar(total=10, stream=plain)
    bar.update()
    bar.write("step 1/10 | loss 1.0")
    assert plain.getvalue() == "step 1/10 | loss 1.0\n"


def test_sinks_receive_every_record(tmp_path, monkeypatch):
    """W&B and MLflow stand-ins injected as modules: the real packages are not installed."""
    calls = []
    run = types.SimpleNamespace(
        log=lambda data, step: calls.append(("wandb", step, data)),
        finish=lambda: calls.append(("wandb.finish",)),
    )
    fake_wandb = types.ModuleType("wandb")
    fake_wandb.init = lambda **kwargs: calls.append(("wandb.init", kwargs["project"])) or run
    fake_mlflow = types.ModuleType("mlflow")
    fake_mlflow.__spec__ = fake_wandb.__spec__ = object()  # find_spec() sees them
    for name in ("set_tracking_uri", "set_experiment", "log_dict", "create_experiment"):
        setattr(fake_mlflow, name, lambda *a, **k: None)
    fake_mlflow.get_experiment_by_name = lambda name: None
    fake_mlflow.start_run = lambda **k: calls.append(("mlflow.start", k["run_name"]))
    fake_mlflow.log_metrics = lambda metrics, step: calls.append(("mlflow", step, metrics))
    fake_mlflow.end_run = lambda: calls.append(("mlflow.end",))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow)

    cfg = {"wandb": {"project": "p", "save_dir": str(tmp_path / "wb")}, "mlflow": {"run_name": "r"}}
    check_installed(cfg)
    logger = MetricsLogger(tmp_path, total_steps=2, sinks=build_sinks(cfg, tmp_path))
    metrics = {"loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1, "images_per_s": 1}
    logger.log_train(1, {**metrics, "peak_memory_gb": 0.1})
    logger.log_validation(1, {"val_loss": 1.5, "val_tokens": 10})
    logger.close()
    assert ("wandb.init", "p") in calls and ("mlflow.start", "r") in calls
    assert ("wandb", 1, {"validation/val_loss": 1.5, "validation/val_tokens": 10.0}) in calls
    assert any(c[0] == "mlflow" and c[2]["train/loss"] == 2.0 for c in calls)
    assert ("wandb.finish",) in calls and ("mlflow.end",) in calls
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_configured_tracker_that_is_not_installed_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UsageError, match="wandb section but wandb is not installed: pip install"):
        check_installed({"wandb": {"project": "p"}})


def test_loss_picture_draws_both_curves(tmp_path):
    train = [{"step": s, "loss": 5.0 / s} for s in range(1, 21)]
    val = [{"step": s, "val_loss": 4.0 / (s + 1)} for s in (0, 10, 20)]
    (tmp_path / "training.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    image = Image.open(plot_losses(tmp_path)).convert("RGB")
    colors = {c for _, c in image.getcolors(2**20)}
    assert (31, 119, 180) in colors and (255, 127, 14) in colors  # training blue, validation orange
    assert plot_losses(tmp_path / "nothing_here") is None


def test_a_blank_sample_that_does_not_fit_max_length_is_a_usage_error():
    """Data parallelism feeds a rank without images a one-word blank-image sample; a max_length
    too short for it (a template with a long system prompt) is said in one line."""
    from automodel.errors import UsageError
    from automodel.training.feed import BatchFeed

    feed = BatchFeed(lambda samples: None, world_size=2)
    with pytest.raises(UsageError, match="max_length"):
        feed.blank_image_inputs(None)
