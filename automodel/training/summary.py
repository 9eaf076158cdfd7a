"""The few lines a run prints before its first step: what is trained, on what, how and where.

The full resolved config is saved as ``checkpoint_dir/config.yaml`` (and printed by
``automodel finetune --print-config``).
"""

from __future__ import annotations

from pathlib import Path


def _source(section: dict | None) -> str:
    """A dataset section's path or hub id, else its builder's name."""
    section = section or {}
    where = section.get("path_or_dataset") or section.get("path") or section.get("_target_")
    return str(where)


def run_summary(
    *,
    cfg: dict,
    model_type: str | None,
    train_samples: int,
    val_samples: int | None,
    max_steps: int,
    local_batch_size: int,
    grad_accum: int,
    world_size: int,
    parameters: tuple[int, int],
    autocast_dtype,
    weight_dtype,
    out_dir: Path,
) -> str:
    """The run's opening summary, one ``name: value`` line per subject.

    Args:
        cfg: the resolved config (model, dataset and step_scheduler sections are read).
        model_type: the model config's ``model_type`` (its family).
        train_samples, val_samples: dataset sizes (None: no validation data).
        max_steps: optimizer steps of the run.
        local_batch_size, grad_accum, world_size: a step's micro-batch, micro-batches and ranks.
        parameters: (trainable, total) parameter counts.
        autocast_dtype, weight_dtype: the forward's autocast dtype (None: off) and the weights'.
        out_dir: ``checkpoint_dir``.
    """
    model = cfg["model"].get("pretrained_model_name_or_path") or cfg["model"].get("_target_")
    data = f"{train_samples:,} training samples from {_source(cfg.get('dataset'))}"
    if val_samples is not None:
        data += f"; {val_samples:,} validation samples"
    global_batch = local_batch_size * grad_accum * world_size
    ranks = f" x {world_size} processes" if world_size > 1 else ""
    trainable, total = parameters
    share = 100 * trainable / max(1, total)
    autocast = str(autocast_dtype).removeprefix("torch.") if autocast_dtype else "off"
    weights = str(weight_dtype).removeprefix("torch.")
    batch = f"{global_batch} global = {local_batch_size} local x {grad_accum} accumulation{ranks}"
    lines = [
        f"model: {model} ({model_type or 'unknown family'})",
        f"data: {data}",
        f"steps: {max_steps:,}",
        f"batch: {batch}",
        f"parameters: {trainable:,} trainable / {total:,} total ({share:.1f}%)",
        f"precision: {weights} weights, autocast {autocast}",
        f"results: {out_dir} (full config in {Path(out_dir) / 'config.yaml'})",
    ]
    return "\n".join(lines)
