"""Evaluation during training: every ``eval_every_steps``, on a fixed validation subset.

Each run appends ``{"step": N, <scores>}`` to ``eval.jsonl`` in the run directory, replaces the
``eval/`` folder with the latest predictions (see ``automodel.eval.evaluate.write_outputs``),
sends the scores to the run's metric sinks (TensorBoard, W&B, MLflow) as ``eval/<score>``,
prints one line, and tracks the best value of ``best_metric`` in ``eval_best.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from automodel.common import is_rank_zero
from automodel.config.sections import EvalConfig
from automodel.errors import UsageError
from automodel.eval.evaluate import default_metrics, evaluate, write_outputs
from automodel.eval.metrics import expand_metric_names, score_names
from automodel.training.metrics import read_jsonl, truncate_log

EVAL_LOG = "eval.jsonl"
BEST_FILE = "eval_best.json"


class PeriodicEvaluator:
    """Runs :func:`automodel.eval.evaluate.evaluate` on a fixed subset every few steps.

    Args:
        processor: the model's processor.
        dataset: the validation dataset; its first ``config.max_samples`` samples are used every
            time.
        out_dir: the run's checkpoint directory.
        every_steps: evaluate when ``step % every_steps == 0``.
        config: the ``eval`` section: ``metrics`` (``None``: the dataset's default),
            ``max_samples`` (size of the fixed subset), ``batch_size`` (prompts per ``generate``
            call), ``max_new_tokens``, ``best_metric`` (the score whose best value is tracked;
            ``None``: the first score), ``gallery_size`` (images kept for ``automodel report``).
        logger: the run's ``MetricsLogger`` (its sinks and console); ``None`` prints.
        start_step: the step a resumed run continues from; later ``eval.jsonl`` records go.
    """

    def __init__(
        self,
        processor,
        dataset,
        out_dir: str | Path,
        every_steps: int,
        config: EvalConfig,
        logger=None,
        start_step: int = 0,
        chat_template_kwargs: dict | None = None,
    ):
        self.processor = processor
        self.chat_template_kwargs = chat_template_kwargs
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        self.every_steps = every_steps
        metrics, best_metric = config.metrics, config.best_metric
        self.metrics = default_metrics(dataset) if metrics is None else expand_metric_names(metrics)
        self.max_samples = config.max_samples
        self.batch_size = config.batch_size
        self.max_new_tokens = config.max_new_tokens
        self.gallery_size = config.gallery_size
        available = score_names(self.metrics)
        self.best_metric = best_metric or available[0]
        if self.best_metric not in available:
            raise UsageError(
                f"eval.best_metric={self.best_metric!r} is not produced by eval.metrics "
                f"{self.metrics}; choose one of {', '.join(available)}"
            )
        self.logger = logger
        self.best: dict[str, Any] | None = None
        if is_rank_zero():
            truncate_log(self.out_dir / EVAL_LOG, start_step)
            (self.out_dir / BEST_FILE).unlink(missing_ok=True)
            for record in read_jsonl(self.out_dir / EVAL_LOG):
                self._update_best(record["step"], record)

    def due(self, step: int) -> bool:
        """True at every ``every_steps``-th step. Not at an odd last step: a short trial run of a
        config (``--step_scheduler.max_steps 3``) should not pay for a generation pass."""
        return step % self.every_steps == 0

    def run(self, model, step: int) -> tuple[dict[str, float], bool]:
        """Evaluates ``model`` now and records the result.

        Returns:
            The scores, and whether ``best_metric`` reached a new best.
        """
        result = evaluate(
            model,
            self.processor,
            self.dataset,
            self.metrics,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            keep_images=self.gallery_size,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        is_best = self._update_best(step, result.scores)
        if is_rank_zero():
            write_outputs(result, self.out_dir / "eval", step=step)
            with open(self.out_dir / EVAL_LOG, "a") as f:
                f.write(json.dumps({"step": step, **result.scores}) + "\n")
        line = ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items())
        mark = f" (best {self.best_metric} so far)" if is_best else ""
        skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
        message = f"eval step {step} ({len(result.records)} samples{skipped}): {line}{mark}"
        if self.logger is None:
            print(message, flush=True)
        else:
            if is_rank_zero():
                scalars = {f"eval/{k}": float(v) for k, v in result.scores.items()}
                for sink in self.logger.sinks:
                    sink.log(scalars, step)
            self.logger.write(message)
        return result.scores, is_best

    def _update_best(self, step: int, scores: dict[str, float]) -> bool:
        # Every task score is better higher (losses are the validation loop's business).
        value = scores.get(self.best_metric)
        if value is None or (self.best is not None and value <= self.best["value"]):
            return False
        self.best = {"metric": self.best_metric, "value": value, "step": step}
        if is_rank_zero():
            (self.out_dir / BEST_FILE).write_text(json.dumps(self.best) + "\n")
        return True


def build_periodic_evaluator(
    config: EvalConfig,
    every_steps: int | None,
    processor,
    dataset,
    out_dir: str | Path,
    logger=None,
    start_step: int = 0,
    chat_template_kwargs: dict | None = None,
) -> PeriodicEvaluator | None:
    """The in-training evaluator, or ``None`` when ``eval_every_steps`` is not set.

    Raises:
        UsageError: evaluation is asked for without a validation dataset, or a key is invalid.
    """
    if not every_steps:
        return None
    if dataset is None:
        raise UsageError(
            "step_scheduler.eval_every_steps is set but there is no validation_dataset; "
            "add one or remove eval_every_steps"
        )
    if every_steps < 1:
        raise UsageError(f"step_scheduler.eval_every_steps={every_steps} must be positive")
    return PeriodicEvaluator(
        processor,
        dataset,
        out_dir,
        every_steps,
        config,
        logger=logger,
        start_step=start_step,
        chat_template_kwargs=chat_template_kwargs,
    )
