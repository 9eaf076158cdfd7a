"""What the VLM fine-tuning recipe reads from its config: sections, keys, types, defaults.

``resolve_config`` turns a loaded YAML into the config the recipe runs: the tutorial's layout
translated, defaults filled in, every key, value and ``_target_`` checked before anything loads.
The plain sections are the dataclasses of ``automodel/config/sections.py``; ``FinetuneConfig``
holds them typed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

from automodel.config.compat import DEFAULT_COLLATE, translate_seed_layout
from automodel.config.sections import (
    CheckpointConfig,
    ClipGradNormConfig,
    CompileConfig,
    DataCheckConfig,
    DistEnvConfig,
    DistributedConfig,
    EvalConfig,
    FreezeConfig,
    LrSchedulerConfig,
    MLflowConfig,
    PackingConfig,
    PrecisionConfig,
    PreviewConfig,
    StepSchedulerConfig,
    VisionCacheConfig,
    WandbConfig,
    check_recipe,
)
from automodel.config.typed import Section
from automodel.config.validate import Schema, validate_config
from automodel.errors import UsageError
from automodel.eval.metrics import expand_metric_names, score_names
from automodel.training.loggers import check_installed

DEFAULT_PEFT = "automodel.peft.LoraConfig"


@dataclass(frozen=True)
class FinetuneConfig:
    """The recipe's plain sections, typed (the ``_target_`` sections stay in the config dict).

    ``wandb`` and ``mlflow`` are ``None`` unless the config has them: their presence turns the
    logger on.
    """

    step_scheduler: StepSchedulerConfig
    lr_scheduler: LrSchedulerConfig
    freeze_config: FreezeConfig
    clip_grad_norm: ClipGradNormConfig
    precision: PrecisionConfig
    checkpoint: CheckpointConfig
    distributed: DistributedConfig
    dist_env: DistEnvConfig
    vision_cache: VisionCacheConfig
    compile: CompileConfig
    packing: PackingConfig
    data_check: DataCheckConfig
    eval: EvalConfig
    preview: PreviewConfig
    wandb: WandbConfig | None
    mlflow: MLflowConfig | None

    @classmethod
    def from_config(cls, cfg: dict) -> FinetuneConfig:
        """The typed sections of a config; absent sections take their defaults.

        Raises:
            UsageError: an unknown key or an invalid value, named.
        """
        built = {}
        for name, section in PLAIN_SECTIONS.items():
            node = cfg.get(name)
            absent = node is None or (section.optional and not node)
            built[name] = None if absent and section.optional else section.from_dict(node or {})
        return cls(**built)

    def to_dicts(self) -> dict[str, dict]:
        """Every present section as a plain dict, defaults filled in (for ``config.yaml``)."""
        return {
            f.name: getattr(self, f.name).to_dict()
            for f in fields(self)
            if getattr(self, f.name) is not None
        }


PLAIN_SECTIONS: dict[str, type[Section]] = {
    section.section: section
    for section in (
        StepSchedulerConfig,
        LrSchedulerConfig,
        FreezeConfig,
        ClipGradNormConfig,
        PrecisionConfig,
        CheckpointConfig,
        DistributedConfig,
        DistEnvConfig,
        VisionCacheConfig,
        CompileConfig,
        PackingConfig,
        DataCheckConfig,
        EvalConfig,
        PreviewConfig,
        WandbConfig,
        MLflowConfig,
    )
}

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
    plain=PLAIN_SECTIONS,
    noticed={
        "ci": "ci: NeMo AutoModel's CI settings (time budget, recipe owner); not used here",
    },
    top_level={"recipe": str | dict, "allowed_target_prefixes": list, "prepare": list},
    target_lists=("prepare",),
    docs={
        "recipe": "optional: the recipe the config is for, as NeMo AutoModel's configs name it: "
        "`FinetuneRecipeForVLM` (or `nemo_automodel.recipes.vlm.finetune.FinetuneRecipeForVLM`, "
        "`automodel.recipes.vlm.finetune.FinetuneRecipeForVLM`, or `{_target_: ...}` of one of "
        "them). The short form `automodel CONFIG.yaml` runs the recipe it names and needs it; any "
        "other recipe stops the run (exit 2)",
        "model": "`_target_: automodel.models.AutoModelForImageTextToText.from_pretrained`, "
        "`pretrained_model_name_or_path`, `torch_dtype`, `attn_implementation`",
        "processor": "optional; defaults to `AutoProcessor` of the model's path",
        "dataset": "a builder: `make_cord_v2_dataset`, `make_image_text_dataset`, "
        "`make_conversation_dataset` (OpenAI parts, LLaVA, ShareGPT), `make_vqa_dataset`, "
        "`make_hf_dataset` (column mapping), all under `automodel.datasets.vlm` "
        "(`path_or_dataset`, `split`, `image_size`, `limit`, `val_fraction` + `seed`); see "
        "[datasets.md](datasets.md)",
        "validation_dataset": "optional; a builder as for `dataset`",
        "dataloader": "`torchdata.stateful_dataloader.StatefulDataLoader` kwargs and "
        "`collate_fn` (`max_length`; `on_overlength`: `drop` (default) or `error` for a sample "
        "that cannot fit without cutting image or all reply tokens; `chat_template_kwargs`: "
        "variables for the chat template, e.g. `{enable_thinking: true}` (thinking is off "
        "unless this or a sample's reasoning turns it on), used by generation too); "
        "`group_by_length: true` "
        "batches samples of similar length (less padding); with `num_workers` above 0 the "
        "training loader keeps its workers across epochs (`persistent_workers` defaults to true)",
        "validation_dataloader": "optional; as `dataloader` (the same loader class unless it "
        "names one; the collate is `dataloader.collate_fn`)",
        "optimizer": "any `torch.optim` class (default AdamW, `lr` 1e-5, `weight_decay` 0.01; "
        "Adam and AdamW run `fused: true` unless the section sets `fused` or `foreach`); "
        "`param_groups`: a list of `{match: REGEX, lr: ..., ...}` giving the parameters whose "
        "name matches (first entry wins) their own options, e.g. "
        "`[{match: projector, lr: 1e-4}]`; an entry that matches no trainable parameter "
        "stops the run",
        "loss_fn": "`automodel.loss.MaskedCrossEntropy` (default), "
        "`automodel.loss.ChunkedCrossEntropy` (`chunk_size`, default: 64 MB of fp32 logits per "
        "chunk: `lm_head` + cross-entropy a chunk of labelled positions at a time, never all "
        "their full-vocabulary logits at once), `automodel.loss.LigerFusedLinearCrossEntropy` "
        "(CUDA, `pip install liger-kernel`)",
        "vision_loss": "`automodel.loss.alignment.ImageTextAlignmentLoss` (`weight`, default "
        "0 = off; `temperature`): contrastive image / answer-text alignment on the projector "
        "output, logged as `vision_loss` beside `language_loss`; any number of processes, not "
        "with `packing`",
        "peft": "optional LoRA through Hugging Face PEFT (`_target_` defaults to "
        "`automodel.peft.LoraConfig`; NeMo's `PeftConfig` target maps to it): `r` (or NeMo's "
        "`dim`), `alpha`, `dropout`, `target_modules` (globs on full module names such as "
        '`"*.q_proj"`, or one regex), `exclude_modules`, `match_all_linear`, `use_dora`, '
        "`use_rslora`, `qlora` (CUDA only). The default adapts every linear layer of the "
        "language model and leaves the vision tower, projector and `lm_head` alone (a bare "
        "`q_proj` would also match SigLIP, CLIP and Idefics3 vision layers)",
        "rng": "`automodel.training.rng.StatefulRNG` (`seed`, default 42)",
        "prepare": "a list of `_target_` calls run first (the quickstart builds its model and "
        "data here)",
        "allowed_target_prefixes": "module prefixes a `_target_` may resolve under besides "
        "`automodel.`, `torch.`, `transformers.`, `peft.`, `datasets.` and `torchdata.`, e.g. "
        "`[mypkg.]`",
    },
)

# Defaults of the sections built from a _target_; the plain sections' live in their dataclasses.
DEFAULTS = {
    "dataloader": {"_target_": "torchdata.stateful_dataloader.StatefulDataLoader"},
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-5, "weight_decay": 0.01},
    "loss_fn": {"_target_": "automodel.loss.MaskedCrossEntropy"},
    "vision_loss": {"_target_": "automodel.loss.alignment.ImageTextAlignmentLoss", "weight": 0.0},
    "rng": {"_target_": "automodel.training.rng.StatefulRNG", "seed": 42},
}

# Keys of the loader sections that the recipe reads itself (never passed to the loader).
LOADER_KEYS = {"group_by_length": bool}


def resolve_config(cfg: dict) -> tuple[dict, list[str]]:
    """Translates the tutorial's layout, fills defaults and validates.

    Returns:
        The resolved config (every plain section with its defaults filled in) and the
        notices to print.

    Raises:
        UsageError: the first unknown key or invalid value, named with its valid choices.
    """
    if "recipe" in cfg:  # a config for another recipe: say so before anything else
        check_recipe(cfg["recipe"])
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
    typed = FinetuneConfig.from_config(resolved)
    resolved.update(typed.to_dicts())
    check_eval(typed.eval)
    check_vision_loss(resolved, typed)
    check_installed(resolved)
    return resolved, notices


def check_vision_loss(resolved: dict, typed: FinetuneConfig) -> None:
    """The alignment loss reads each padded row's image and reply positions: it cannot read
    packed rows, so the two are refused together before anything loads."""
    if resolved["vision_loss"].get("weight") and typed.packing.enabled:
        raise UsageError(
            "vision_loss.weight > 0 with packing.enabled=true: the alignment loss needs padded "
            "rows; set packing.enabled=false or vision_loss.weight=0"
        )


def check_eval(settings: EvalConfig) -> None:
    """The ``eval`` settings that can be checked without the dataset: metric names, and the
    tracked score when the metrics are named."""
    if settings.metrics is None:
        return  # the dataset's own metrics: known once it is built
    available = score_names(expand_metric_names(settings.metrics))
    if settings.best_metric is not None and settings.best_metric not in available:
        raise UsageError(
            f"eval.best_metric: {settings.best_metric!r} is not one of {', '.join(available)} "
            f"(the scores of eval.metrics {settings.metrics})"
        )
