"""``automodel evaluate``: a saved model on a config's validation data, scored by task metrics."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from automodel.config.instantiate import instantiate
from automodel.config.sections import EvalConfig
from automodel.errors import UsageError
from automodel.eval.evaluate import EvalResult, evaluate, markdown_table, write_outputs
from automodel.eval.metrics import expand_metric_names
from automodel.paths import is_local_path


def default_out_dir(model: str, split: str) -> Path:
    """Beside a local model folder (``checkpoints/final_model`` -> ``checkpoints/eval_<split>``);
    ``./eval_<split>`` for a hub id."""
    name = "eval_" + re.sub(r"[^\w.-]+", "_", split).strip("_")
    if is_local_path(model):
        return Path(model).expanduser().resolve().parent / name
    return Path(name)


def evaluation_dataset(cfg: dict, split: str | None, extra_prefixes: tuple[str, ...] = ()) -> Any:
    """The config's ``validation_dataset`` (or ``dataset``), with ``split`` replaced if given.

    Raises:
        UsageError: the config has no dataset section to evaluate on.
    """
    section = "validation_dataset" if cfg.get("validation_dataset") else "dataset"
    if not cfg.get(section):
        raise UsageError("the config has neither validation_dataset nor dataset to evaluate on")
    node = copy.deepcopy(cfg[section])
    if split is not None:
        node["split"] = split
    return instantiate(node, where=section, extra_prefixes=extra_prefixes)


def run_evaluation(
    cfg: dict,
    model_dir: str,
    split: str | None = None,
    max_samples: int | None = None,
    out_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> tuple[EvalResult, Path]:
    """Loads ``model_dir``, evaluates it on the config's data, and writes the outputs.

    Args:
        cfg: a resolved fine-tuning config (its dataset sections and ``eval`` section are read).
        model_dir: a Hugging Face model folder (or hub id).
        split: replaces the dataset's ``split`` (e.g. ``test``); ``None`` keeps the config's.
        max_samples: evaluate only the first samples; ``None`` evaluates the whole split.
        out_dir: where ``metrics.json``, ``predictions.jsonl`` and ``images/`` go; by default
            :func:`default_out_dir`.
        batch_size: overrides ``eval.batch_size``.

    Returns:
        The result and the folder it was written to.
    """
    from automodel.models.auto import AutoModelForImageTextToText, load_processor

    eval_cfg = EvalConfig.from_dict(cfg.get("eval") or {})
    # Checked before anything loads, so a misspelt metric costs no model load.
    metrics = eval_cfg.metrics
    metrics = None if metrics is None else expand_metric_names(metrics)
    extra = tuple(cfg.get("allowed_target_prefixes") or ())
    dataset = evaluation_dataset(cfg, split, extra)
    split_name = split or cfg.get("validation_dataset", cfg.get("dataset", {})).get(
        "split", "validation"
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir)).to(device)
    processor = load_processor(str(model_dir))
    result = evaluate(
        model,
        processor,
        dataset,
        metrics,
        max_samples=max_samples,
        batch_size=batch_size or eval_cfg.batch_size,
        max_new_tokens=eval_cfg.max_new_tokens,
        keep_images=eval_cfg.gallery_size,
        progress=True,
    )
    out = Path(out_dir) if out_dir is not None else default_out_dir(str(model_dir), split_name)
    write_outputs(result, out, model=str(model_dir), split=split_name)
    return result, out


__all__ = ["default_out_dir", "evaluation_dataset", "markdown_table", "run_evaluation"]
