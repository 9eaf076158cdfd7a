"""What the VLM fine-tuning recipe reads from its config: sections, keys, types, defaults.

``resolve_config`` turns a loaded YAML into the config the recipe runs: the tutorial's layout
translated, defaults filled in, every key and ``_target_`` checked before anything loads.
"""

from __future__ import annotations

import copy

from automodel.config.compat import DEFAULT_COLLATE, translate_seed_layout
from automodel.config.validate import Schema, validate_config
from automodel.distributed.parallelize import STRATEGIES
from automodel.errors import UsageError
from automodel.training.loggers import check_installed

DEFAULT_PEFT = "automodel.peft.LoraConfig"

SCHEMA = Schema(
    targets={
        "model": True,
        "processor": False,
        "dataset": True,
        "validation_dataset": False,
        "dataloader": False,
        "validation_dataloader": False,
        "optimizer": False,
        "loss_fn": False,
        "vision_loss": False,
        "peft": False,
        "rng": False,
    },
    plain={
        "step_scheduler": {
            "max_steps": (int, type(None)),
            "num_epochs": (int, type(None)),
            "global_batch_size": int,
            "local_batch_size": int,
            "log_every_steps": int,
            "val_every_steps": (int, type(None)),
            "val_batches": (int, type(None)),
            "ckpt_every_steps": (int, type(None)),
            "max_consecutive_nonfinite": int,
            "eval_every_steps": (int, type(None)),
        },
        "lr_scheduler": {
            "lr_warmup_steps": (int, float),
            "lr_decay_style": str,
            "min_lr": float,
        },
        "freeze_config": {
            "freeze_vision_tower": bool,
            "freeze_projector": bool,
            "freeze_language_model": bool,
            "freeze_embeddings": bool,
        },
        "clip_grad_norm": {"max_norm": (float, type(None))},
        "precision": {"autocast": str, "fp32_attention_on_cpu": bool},
        "checkpoint": {
            "enabled": bool,
            "checkpoint_dir": str,
            "model_save_format": str,
            "save_consolidated": bool,
            "keep_last_n": (int, type(None)),
            "restore_from": (str, type(None)),
        },
        "wandb": {
            "project": (str, type(None)),
            "entity": (str, type(None)),
            "name": (str, type(None)),
            "save_dir": (str, type(None)),
            "group": (str, type(None)),
            "tags": (list, type(None)),
            "notes": (str, type(None)),
            "mode": (str, type(None)),
            "id": (str, type(None)),
            "resume": (str, type(None)),
        },
        "mlflow": {
            "experiment_name": (str, type(None)),
            "run_name": (str, type(None)),
            "tracking_uri": (str, type(None)),
            "artifact_location": (str, type(None)),
            "tags": (dict, type(None)),
        },
        "preview": {"num_samples": int, "max_new_tokens": int},
        "eval": {
            "metrics": (list, str, type(None)),
            "max_samples": int,
            "batch_size": int,
            "max_new_tokens": int,
            "best_metric": (str, type(None)),
            "gallery_size": int,
        },
        "data_check": {"on_bad_sample": str, "max_bad_fraction": float},
        "distributed": {
            "strategy": str,
            "dp_size": (int, str, type(None)),
            "tp_size": int,
            "cp_size": int,
            "sequence_parallel": bool,
            "activation_checkpointing": bool,
            "param_dtype": (str, type(None)),
            "reduce_dtype": (str, type(None)),
            "cpu_offload": bool,
        },
        "dist_env": {"backend": (str, type(None)), "timeout_minutes": int},
        "vision_cache": {
            "enabled": bool,
            "max_images": (int, type(None)),
            "device": (str, type(None)),
        },
        "packing": {"enabled": bool, "pack_length": (int, type(None))},
        "compile": {
            "enabled": bool,
            "mode": (str, type(None)),
            "dynamic": (bool, type(None)),
            "fullgraph": bool,
            "backend": str,
        },
    },
    top_level={"allowed_target_prefixes": list, "prepare": list},
)

DEFAULTS = {
    "dataloader": {"_target_": "torchdata.stateful_dataloader.StatefulDataLoader"},
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-5, "weight_decay": 0.01},
    "loss_fn": {"_target_": "automodel.loss.MaskedCrossEntropy"},
    "vision_loss": {"_target_": "automodel.loss.alignment.ImageTextAlignmentLoss", "weight": 0.0},
    "rng": {"_target_": "automodel.training.rng.StatefulRNG", "seed": 42},
    "step_scheduler": {
        "global_batch_size": 8,
        "local_batch_size": 1,
        "log_every_steps": 1,
        "max_consecutive_nonfinite": 5,
    },
    "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "cosine", "min_lr": 0.0},
    "freeze_config": {"freeze_vision_tower": True},
    "clip_grad_norm": {"max_norm": 1.0},
    "precision": {"autocast": "auto", "fp32_attention_on_cpu": True},
    "checkpoint": {"enabled": True, "checkpoint_dir": "checkpoints", "keep_last_n": None},
    "preview": {"num_samples": 0, "max_new_tokens": 128},
    "eval": {
        "metrics": None,
        "max_samples": 32,
        "batch_size": 8,
        "max_new_tokens": 256,
        "best_metric": None,
        "gallery_size": 8,
    },
    "data_check": {"on_bad_sample": "error", "max_bad_fraction": 0.1},
    "distributed": {"strategy": "fsdp2", "activation_checkpointing": False, "cpu_offload": False},
    "dist_env": {"backend": None, "timeout_minutes": 10},
    "vision_cache": {"enabled": False},
    "packing": {"enabled": False},
    "compile": {"enabled": False},
}

# Keys of the loader sections that the recipe reads itself (never passed to the loader).
LOADER_KEYS = {"group_by_length": bool}


def resolve_config(cfg: dict) -> tuple[dict, list[str]]:
    """Translates the tutorial's layout, fills defaults and validates.

    Returns:
        The resolved config and the notices to print.
    """
    resolved = translate_seed_layout(copy.deepcopy(cfg))
    if isinstance(resolved.get("peft"), dict):
        resolved["peft"].setdefault("_target_", DEFAULT_PEFT)
    for section, defaults in DEFAULTS.items():
        node = resolved.setdefault(section, {})
        if not isinstance(node, dict):
            raise UsageError(f"{section} must be a section of keys, got {node!r}")
        for key, value in defaults.items():
            node.setdefault(key, copy.deepcopy(value))
    collate = resolved["dataloader"].setdefault("collate_fn", {"_target_": DEFAULT_COLLATE})
    collate.setdefault("_target_", DEFAULT_COLLATE)
    # A validation_dataloader section builds the same loader class unless it names one (the
    # collate is dataloader.collate_fn's for both).
    if isinstance(resolved.get("validation_dataloader"), dict):
        resolved["validation_dataloader"].setdefault("_target_", DEFAULTS["dataloader"]["_target_"])
    own = {}
    for section in ("dataloader", "validation_dataloader"):
        node = resolved.get(section)
        if isinstance(node, dict):
            own[section] = {k: node.pop(k) for k in LOADER_KEYS if k in node}
    # optimizer.param_groups is read by build_optimizer, not passed to the optimizer's class.
    groups = resolved["optimizer"].pop("param_groups", None)
    notices = validate_config(resolved, SCHEMA)
    if groups is not None:
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise UsageError(
                f"optimizer.param_groups={groups!r} should be a list of {{match: REGEX, lr: ...}}"
            )
        resolved["optimizer"]["param_groups"] = groups
    for section, keys in own.items():
        for key, value in keys.items():
            if not isinstance(value, LOADER_KEYS[key]):
                raise UsageError(f"{section}.{key}={value!r} should be true or false")
        resolved[section].update(keys)
    strategy = resolved["distributed"]["strategy"]
    if strategy not in STRATEGIES:
        raise UsageError(f"distributed.strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
    check_installed(resolved)
    return resolved, notices
