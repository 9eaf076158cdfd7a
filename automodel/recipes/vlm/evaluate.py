"""``automodel evaluate``: a saved model on a config's validation data, scored by task metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from automodel.config.sections import EvalConfig
from automodel.errors import UsageError
from automodel.eval.evaluate import EvalResult, default_out_dir, evaluate, write_outputs
from automodel.eval.metrics import expand_metric_names
from automodel.models.auto import load_for_inference, load_processor
from automodel.recipes.vlm.builders import build_dataset, chat_template_kwargs


def evaluation_dataset(cfg: dict, split: str | None) -> tuple[Any, str]:
    """The config's ``validation_dataset`` (or ``dataset``), with ``split`` replaced if given,
    and the split's name.

    Raises:
        UsageError: the config has no dataset section to evaluate on.
    """
    section = "validation_dataset" if cfg.get("validation_dataset") else "dataset"
    if not cfg.get(section):
        raise UsageError("the config has neither validation_dataset nor dataset to evaluate on")
    return build_dataset(cfg, section, split=split), split or cfg[section].get(
        "split", "validation"
    )


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
            ``eval_<split>/`` beside the model folder (``default_out_dir``).
        batch_size: overrides ``eval.batch_size``.

    Returns:
        The result and the folder it was written to.
    """
    eval_cfg = EvalConfig.from_dict(cfg.get("eval") or {})
    # Checked before anything loads, so a misspelt metric costs no model load.
    metrics = eval_cfg.metrics
    metrics = None if metrics is None else expand_metric_names(metrics)
    dataset, split_name = evaluation_dataset(cfg, split)
    # The model folder runs its own code only when the config's model section allows it.
    trust = bool((cfg.get("model") or {}).get("trust_remote_code", False))
    model = load_for_inference(str(model_dir), trust_remote_code=trust)
    processor = load_processor(str(model_dir), trust_remote_code=trust)
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
        chat_template_kwargs=chat_template_kwargs(cfg),
    )
    out = Path(out_dir) if out_dir is not None else default_out_dir(str(model_dir), split_name)
    write_outputs(result, out, model=str(model_dir), split=split_name)
    return result, out
