"""Where metrics go besides the console and the JSON lines: TensorBoard, W&B, MLflow.

TensorBoard event files are always written (``checkpoint_dir/tensorboard/``). W&B and MLflow are
imported only when their config section is present, so neither is a dependency.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Protocol

from automodel.config.sections import MLflowConfig, WandbConfig
from automodel.errors import UsageError


class MetricsSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _import(module: str, section: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"the config has a {section} section but {module} is not installed: "
            f"pip install {module}, or remove the {section} section"
        ) from None


class TensorBoardSink:
    """Scalars as TensorBoard events under ``log_dir``.

    Args:
        log_dir: the events folder.
        start_step: the step a resumed run continues from; events after it, written by the run
            that was interrupted, are hidden (TensorBoard's ``purge_step``).
    """

    def __init__(self, log_dir: str | Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run: the ``wandb`` section's keys go to ``wandb.init`` (``save_dir`` is its ``dir``).

    Args:
        section: the config's ``wandb`` section (``project``, ``entity``, ``name``, ...).
        cfg: the resolved config, recorded as the run's config.
        out_dir: the default ``dir`` for W&B's local files.
    """

    def __init__(self, section: WandbConfig, cfg: dict, out_dir: str | Path):
        wandb = _import("wandb", "wandb")
        kwargs = {k: v for k, v in section.to_dict().items() if v is not None}
        save_dir = kwargs.pop("save_dir", None) or out_dir
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(save_dir), config=cfg, **kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowSink:
    """An MLflow run in ``experiment_name``; the resolved config is logged as ``config.json``.

    Args:
        section: the config's ``mlflow`` section (``experiment_name``, ``run_name``,
            ``tracking_uri``, ``artifact_location``, ``tags``), NeMo AutoModel's keys.
        cfg: the resolved config.
    """

    def __init__(self, section: MLflowConfig, cfg: dict):
        mlflow = _import("mlflow", "mlflow")
        if section.tracking_uri:
            mlflow.set_tracking_uri(section.tracking_uri)
        name = section.experiment_name or "automodel"
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=section.artifact_location)
        mlflow.set_experiment(name)
        mlflow.start_run(run_name=section.run_name or None, tags=section.tags or None)
        mlflow.log_dict(cfg, "config.json")
        self.mlflow = mlflow

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def check_installed(cfg: dict) -> None:
    """Fails before anything loads when a ``wandb`` / ``mlflow`` section names a missing package.

    Raises:
        UsageError: naming the section and the package.
    """
    for section in ("wandb", "mlflow"):
        if cfg.get(section) and importlib.util.find_spec(section) is None:
            _import(section, section)


def build_sinks(cfg: dict, out_dir: str | Path, start_step: int = 0) -> list[MetricsSink]:
    """TensorBoard always; W&B and MLflow when the config has a ``wandb`` / ``mlflow`` section.

    Raises:
        UsageError: a section is present but its package is not installed.
    """
    sinks: list[MetricsSink] = [TensorBoardSink(Path(out_dir) / "tensorboard", start_step)]
    if cfg.get("wandb"):
        sinks.append(WandbSink(WandbConfig.from_dict(cfg["wandb"]), cfg, out_dir))
    if cfg.get("mlflow"):
        sinks.append(MLflowSink(MLflowConfig.from_dict(cfg["mlflow"]), cfg))
    return sinks
