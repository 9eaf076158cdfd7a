"""The plain config sections, one dataclass each: keys, types, choices, ranges and defaults.

This module is the only place a plain section's default lives; the components take these
objects, and ``docs/config.md`` is generated from them (``python -m
automodel.recipes.vlm.reference``). The choices the code acts on are the ``Literal`` aliases
below; the components read them from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from automodel.config.typed import Section, doc, fix_hint
from automodel.errors import UsageError

Autocast = Literal["auto", "bf16", "fp16", "none"]
DecayStyle = Literal["cosine", "linear", "constant"]
Strategy = Literal["none", "ddp", "fsdp2"]
OnBadSample = Literal["error", "skip"]
DTypeName = Literal[
    "bfloat16",
    "float16",
    "float32",
    "bf16",
    "fp16",
    "fp32",
    "torch.bfloat16",
    "torch.float16",
    "torch.float32",
]
VisionCacheStorage = Literal["memory", "disk"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

# The top-level `recipe` key: NeMo AutoModel's configs open with `recipe: FinetuneRecipeForVLM`,
# the recipe class its CLI (`automodel CONFIG.yaml`) runs. Ours runs one recipe, VLM
# fine-tuning; these are the names that select it (bare, or NeMo's or our dotted path).
VLM_RECIPE = "FinetuneRecipeForVLM"
VLM_RECIPE_NAMES = (
    VLM_RECIPE,
    f"automodel.recipes.vlm.finetune.{VLM_RECIPE}",
    f"nemo_automodel.recipes.vlm.finetune.{VLM_RECIPE}",
)


def check_recipe(value: object) -> None:
    """Accepts a ``recipe`` value that names the VLM fine-tuning recipe.

    Args:
        value: ``FinetuneRecipeForVLM``, a dotted path of ``VLM_RECIPE_NAMES``, or NeMo
            AutoModel's mapping form ``{_target_: <one of those>}``.

    Raises:
        UsageError: any other recipe, in one line saying what automodel runs.
    """
    name = value
    if isinstance(value, dict) and list(value) == ["_target_"]:
        name = value["_target_"]
    if isinstance(name, str) and name.strip() in VLM_RECIPE_NAMES:
        return
    raise UsageError(
        f"recipe: {value!r} is not a recipe automodel runs; it runs one, {VLM_RECIPE} "
        "(fine-tuning vision-language models)"
    )


@dataclass(frozen=True)
class StepSchedulerConfig(Section):
    """How long the run is, its batch sizes, and how often it logs, validates and saves."""

    section: ClassVar[str] = "step_scheduler"

    max_steps: int | None = field(
        default=None,
        metadata=doc("optimizer steps to run (null or 0: `num_epochs` over the dataset)", ge=0),
    )
    num_epochs: int | None = field(
        default=None, metadata=doc("epochs to run when `max_steps` is not set (null: 1)", ge=0)
    )
    global_batch_size: int = field(
        default=8, metadata=doc("samples per optimizer step, over all ranks", ge=1)
    )
    local_batch_size: int = field(
        default=1,
        metadata=doc(
            "samples per micro-batch on one rank (accumulation = global / (local x data-parallel "
            "ranks))",
            ge=1,
        ),
    )
    log_every_steps: int = field(
        default=1, metadata=doc("steps between console / JSONL log lines", ge=1)
    )
    val_every_steps: int | None = field(
        default=None,
        metadata=doc(
            "steps between validation-loss passes, besides the ones before the first and after the last step",
            ge=0,
        ),
    )
    val_batches: int | None = field(
        default=None,
        metadata=doc("validation batches per pass (null: the whole validation set)", ge=1),
    )
    ckpt_every_steps: int | None = field(
        default=None,
        metadata=doc(
            "steps between step checkpoints, plus one at the last step (null or 0: no step checkpoints)",
            ge=0,
        ),
    )
    max_consecutive_nonfinite: int = field(
        default=5, metadata=doc("that many non-finite steps in a row stop the run", ge=1)
    )
    eval_every_steps: int | None = field(
        default=None,
        metadata=doc(
            "steps between generation-based evaluations (see `eval`; null or 0: none)", ge=0
        ),
    )


@dataclass(frozen=True)
class LrSchedulerConfig(Section):
    """Linear warmup, then a decay to `min_lr` at the last step."""

    section: ClassVar[str] = "lr_scheduler"

    lr_warmup_steps: float = field(
        default=0,
        metadata=doc("steps of linear warmup from 0, or a fraction (< 1) of the run's steps", ge=0),
    )
    lr_decay_style: DecayStyle = field(
        default="cosine", metadata=doc("the shape of the decay after warmup")
    )
    min_lr: float = field(
        default=0.0, metadata=doc("the learning rate reached at the last step", ge=0)
    )


@dataclass(frozen=True)
class FreezeConfig(Section):
    """Parts of the model whose parameters do not train; the run prints trainable / total."""

    section: ClassVar[str] = "freeze_config"

    freeze_vision_tower: bool = field(
        default=True, metadata=doc("the image encoder (the projector stays trainable)")
    )
    freeze_projector: bool = field(default=False, metadata=doc("the vision-to-language projector"))
    freeze_language_model: bool = field(default=False, metadata=doc("the decoder and `lm_head`"))
    freeze_embeddings: bool = field(
        default=False,
        metadata=doc(
            "the input token embeddings (with tied embeddings, as in Gemma 3 and PaliGemma, "
            "`lm_head` too)"
        ),
    )


@dataclass(frozen=True)
class ClipGradNormConfig(Section):
    """Gradient clipping before each optimizer step."""

    section: ClassVar[str] = "clip_grad_norm"

    max_norm: float | None = field(
        default=1.0, metadata=doc("the largest total gradient norm (null or 0: no clipping)", ge=0)
    )


@dataclass(frozen=True)
class PrecisionConfig(Section):
    """Autocast for the forward pass."""

    section: ClassVar[str] = "precision"

    autocast: Autocast = field(
        default="auto",
        metadata=doc(
            "`auto`: bf16 on GPUs that support it, none on CPU; or `bf16`, `fp16`, `none` "
            "(on a CPU, `bf16` / `fp16` only where torch has native kernels for them: AVX512 or "
            "AMX; refused elsewhere, where they run many times slower than fp32)"
        ),
    )
    fp32_attention_on_cpu: bool = field(
        default=True,
        metadata=doc(
            "under bf16 / fp16 autocast on a CPU, attention runs in fp32, where torch's CPU kernels "
            "are 2-3x faster than in bf16"
        ),
    )


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """Where the run writes its outputs, and its step checkpoints."""

    section: ClassVar[str] = "checkpoint"

    enabled: bool = field(default=True, metadata=doc("write step checkpoints and resume from them"))
    checkpoint_dir: str = field(default="checkpoints", metadata=doc("the run's output folder"))
    keep_last_n: int | None = field(
        default=None,
        metadata=doc(
            "step checkpoints kept (null: all; the `LOWEST_VAL` and `BEST` checkpoints are kept too)",
            ge=1,
        ),
    )
    restore_from: str | None = field(
        default=None,
        metadata=doc(
            "a step folder or another run's `checkpoint_dir`, used when this run has no checkpoint "
            "of its own"
        ),
    )
    model_save_format: str | None = field(
        default=None, metadata=doc("NeMo AutoModel's key, accepted and not used")
    )
    save_consolidated: bool | None = field(
        default=None, metadata=doc("NeMo AutoModel's key, accepted and not used")
    )


@dataclass(frozen=True)
class DistributedConfig(Section):
    """Data parallelism when more than one process runs (see docs/distributed.md)."""

    section: ClassVar[str] = "distributed"

    strategy: Strategy = field(
        default="fsdp2", metadata=doc("how the model is wrapped over the processes")
    )
    dp_size: int | str | None = field(
        default=None, metadata=doc("data-parallel ranks (null or `none`: all processes)", ge=1)
    )
    tp_size: int = field(
        default=1, metadata=doc("NeMo AutoModel's tensor parallelism: accepted, only 1", ge=1, le=1)
    )
    cp_size: int = field(
        default=1,
        metadata=doc("NeMo AutoModel's context parallelism: accepted, only 1", ge=1, le=1),
    )
    sequence_parallel: Literal[False] = field(
        default=False, metadata=doc("NeMo AutoModel's sequence parallelism: accepted, only false")
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=doc("recompute each block's activations in backward (in one process too)"),
    )
    param_dtype: DTypeName | None = field(
        default=None,
        metadata=doc(
            "FSDP2 mixed precision: the dtype parameters are gathered in (e.g. `bfloat16`)"
        ),
    )
    reduce_dtype: DTypeName | None = field(
        default=None,
        metadata=doc("FSDP2 mixed precision: the dtype gradients are reduced in (e.g. `float32`)"),
    )
    cpu_offload: bool = field(
        default=False, metadata=doc("FSDP2: keep parameters and optimizer state on the CPU")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dp_size, str) and self.dp_size.lower() != "none":
            raise UsageError(
                f"distributed.dp_size: {self.dp_size!r} is not a positive integer, null or none"
                + fix_hint("distributed.dp_size")
            )

    @property
    def num_dp_ranks(self) -> int | None:
        """``dp_size`` as a number; ``None`` for all processes."""
        return None if isinstance(self.dp_size, str) else self.dp_size


@dataclass(frozen=True)
class DistEnvConfig(Section):
    """The process group."""

    section: ClassVar[str] = "dist_env"

    backend: str | None = field(default=None, metadata=doc("null: nccl with CUDA, gloo otherwise"))
    timeout_minutes: int = field(
        default=10, metadata=doc("how long a collective may wait before the job fails", ge=1)
    )


@dataclass(frozen=True)
class VisionCacheConfig(Section):
    """Keep the frozen vision tower's output per image and skip the tower for images seen
    before: in memory for the run's later epochs, or on disk for later epochs, runs and resumes
    (`automodel data cache-features` fills it ahead of a run). An entry is keyed by the image's
    pixels, the tower's weights and attention implementation, and the device and autocast dtype
    it ran in, so a run reuses only outputs its own tower would compute. Refused when the tower
    trains."""

    section: ClassVar[str] = "vision_cache"

    enabled: bool = field(default=False, metadata=doc("turn the cache on"))
    storage: VisionCacheStorage = field(
        default="memory",
        metadata=doc(
            "`memory`: for this run's later epochs; `disk`: one file per image under `path`, "
            "read back by later epochs, runs and resumes"
        ),
    )
    path: str | None = field(
        default="~/.cache/automodel/vision_features",
        metadata=doc(
            "`storage: disk`'s folder, shared by runs (a subfolder per tower; a relative path "
            "starts where the command runs)"
        ),
    )
    max_images: int | None = field(
        default=None, metadata=doc("stop adding entries after this many (null: no limit)", ge=0)
    )
    device: str | None = field(
        default="cpu", metadata=doc("`storage: memory`: where cached outputs live")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enabled and self.storage == "disk":
            check_cache_folder(self.path)


def check_cache_folder(path: str | None) -> None:
    """Refuses a ``vision_cache.path`` that cannot be created or written, without creating it.

    Raises:
        UsageError: ``path`` is empty, is a file, or its nearest existing folder is not
            writable (one line).
    """
    key = "vision_cache.path"
    fix = fix_hint(key)
    if not path or not path.strip():
        raise UsageError(f"vision_cache.storage=disk needs {key}, the folder it writes to{fix}")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{key}: {path} is a file, not a folder{fix}")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{key}: {path} cannot be written ({existing} is not writable){fix}")


@dataclass(frozen=True)
class CompileConfig(Section):
    """`torch.compile` of each decoder block in place."""

    section: ClassVar[str] = "compile"

    enabled: bool = field(default=False, metadata=doc("compile the decoder blocks"))
    mode: CompileMode | None = field(
        default=None, metadata=doc("`torch.compile`'s mode (null: its default)")
    )
    dynamic: bool | None = field(
        default=True,
        metadata=doc(
            "`torch.compile`'s dynamic shapes (true avoids a recompile per sequence length)"
        ),
    )
    fullgraph: bool = field(default=False, metadata=doc("`torch.compile`'s fullgraph"))
    backend: str = field(default="inductor", metadata=doc("`torch.compile`'s backend"))


@dataclass(frozen=True)
class PackingConfig(Section):
    """Lay each micro-batch's samples end to end instead of padding them, kept apart by
    restarting position ids (Qwen's mRoPE included) and a per-sample attention mask (Gemma 3's
    bidirectional image blocks and PaliGemma's prefix kept). It pays when lengths in a
    micro-batch vary a lot; one long row costs more on the CPU, where attention runs over the
    whole row under a mask."""

    section: ClassVar[str] = "packing"

    enabled: bool = field(default=False, metadata=doc("pack the micro-batches"))
    pack_length: int | None = field(
        default=None,
        metadata=doc(
            "the longest row in tokens (null: the micro-batch's longest sample; a row never grows "
            "longer than the padded batch unless this says so)",
            ge=1,
        ),
    )


@dataclass(frozen=True)
class DataCheckConfig(Section):
    """The scan of every sample before step 1 (record parses, reply present, images open)."""

    section: ClassVar[str] = "data_check"

    on_bad_sample: OnBadSample = field(
        default="error",
        metadata=doc(
            "`error` stops before step 1 naming file:line and reason; `skip` skips, counts and "
            "writes `bad_samples.<section>.jsonl`"
        ),
    )
    max_bad_fraction: float = field(
        default=0.1,
        metadata=doc(
            "with `skip`, more bad samples than this share still stop the run", ge=0, le=1
        ),
    )


@dataclass(frozen=True)
class EvalConfig(Section):
    """Generation-based task metrics every `step_scheduler.eval_every_steps`, and for
    `automodel evaluate`."""

    section: ClassVar[str] = "eval"

    metrics: list | str | None = field(
        default=None,
        metadata=doc(
            "null: the dataset's own (e.g. `cord` for CORD-v2); or a list of `cord`, `vqa`, "
            "`exact_match`, `anls`, `caption`, `bleu4`, `cider`"
        ),
    )
    max_samples: int = field(
        default=32, metadata=doc("the fixed validation subset evaluated during training", ge=1)
    )
    batch_size: int = field(default=8, metadata=doc("samples generated at once", ge=1))
    max_new_tokens: int = field(default=256, metadata=doc("the longest reply generated", ge=1))
    best_metric: str | None = field(
        default=None, metadata=doc("the score tracked in `eval_best.json` (null: the first score)")
    )
    gallery_size: int = field(default=8, metadata=doc("images kept for the report", ge=0))


@dataclass(frozen=True)
class PreviewConfig(Section):
    """Replies printed for validation samples after training."""

    section: ClassVar[str] = "preview"

    num_samples: int = field(default=0, metadata=doc("validation samples shown (0: none)", ge=0))
    max_new_tokens: int = field(default=128, metadata=doc("the longest reply generated", ge=1))


@dataclass(frozen=True)
class WandbConfig(Section):
    """Optional: log to Weights & Biases (`wandb.init`'s arguments); needs `pip install wandb`."""

    section: ClassVar[str] = "wandb"
    optional: ClassVar[bool] = True

    project: str | None = field(default=None, metadata=doc("the W&B project"))
    entity: str | None = field(default=None, metadata=doc("the W&B team or user"))
    name: str | None = field(default=None, metadata=doc("the run's name"))
    save_dir: str | None = field(
        default=None, metadata=doc("W&B's local files (null: the run's checkpoint_dir)")
    )
    group: str | None = field(default=None, metadata=doc("the run's group"))
    tags: list | None = field(default=None, metadata=doc("the run's tags"))
    notes: str | None = field(default=None, metadata=doc("the run's notes"))
    mode: str | None = field(default=None, metadata=doc("`online`, `offline` or `disabled`"))
    id: str | None = field(default=None, metadata=doc("the run's id (to resume a W&B run)"))
    resume: str | None = field(default=None, metadata=doc("`wandb.init`'s resume"))


@dataclass(frozen=True)
class MLflowConfig(Section):
    """Optional: log to MLflow (NeMo AutoModel's keys); needs `pip install mlflow`."""

    section: ClassVar[str] = "mlflow"
    optional: ClassVar[bool] = True

    experiment_name: str | None = field(
        default=None, metadata=doc("the experiment (null: `automodel`)")
    )
    run_name: str | None = field(default=None, metadata=doc("the run's name"))
    tracking_uri: str | None = field(default=None, metadata=doc("the tracking server"))
    artifact_location: str | None = field(
        default=None, metadata=doc("where a new experiment keeps its artifacts")
    )
    tags: dict | None = field(default=None, metadata=doc("the run's tags"))
