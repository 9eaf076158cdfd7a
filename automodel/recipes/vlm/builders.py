"""From a resolved config to the components every command shares.

``finetune``, ``data check`` and ``evaluate`` build their prepare steps, processor, model,
datasets, collate and loaders here, so the three read a config the same way. Each function
takes the resolved config (``resolve_config``) and the runtime objects the config cannot hold
(a device, a processor, a rank).
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch
from torch import nn

from automodel.common import parse_dtype, print0
from automodel.config.instantiate import accepted_keywords, instantiate, resolve_target
from automodel.config.sections import DataCheckConfig, FreezeConfig, StepSchedulerConfig
from automodel.datasets.checks import screen_dataset
from automodel.datasets.samplers import make_sampler
from automodel.distributed.env import barrier
from automodel.distributed.parallelize import DTYPE_KEYS, build_mesh, parallelize
from automodel.errors import UsageError
from automodel.models import families
from automodel.models.auto import load_processor
from automodel.models.forward import TrainForward
from automodel.models.freeze import apply_freeze
from automodel.models.packing import Packer
from automodel.peft import apply_lora
from automodel.recipes.vlm.config import FinetuneConfig
from automodel.training.feed import BatchFeed
from automodel.training.signals import IgnoreStopSignals

DATASET_SECTIONS = ("dataset", "validation_dataset")


def extra_prefixes(cfg: dict) -> tuple[str, ...]:
    """The module prefixes the config allows ``_target_`` to name beyond the built-in ones."""
    return tuple(cfg.get("allowed_target_prefixes") or ())


def build(cfg: dict, section: str, *args: Any, **kwargs: Any) -> Any:
    """Instantiates the config's ``section``; ``args`` and ``kwargs`` are runtime objects."""
    return instantiate(
        cfg[section], *args, where=section, extra_prefixes=extra_prefixes(cfg), **kwargs
    )


def run_prepare(cfg: dict, local_rank: int = 0) -> None:
    """Runs the config's ``prepare`` targets (e.g. building a tiny model or a dataset), once per
    node: the node's other processes wait for it."""
    steps = cfg.get("prepare") or []
    if not isinstance(steps, list):
        raise UsageError("prepare must be a list of _target_ entries")
    if local_rank == 0:
        for i, node in enumerate(steps):
            instantiate(node, where=f"prepare[{i}]", extra_prefixes=extra_prefixes(cfg))
    barrier()


def build_processor(cfg: dict):
    """The ``processor`` section, else the model folder's own processor; its chat template
    carries the family's fix-up (with a one-line notice), so ``final_model`` ships it too.

    The processor runs its folder's own code only as the model does: ``trust_remote_code``
    comes from the processor section, else the model section (default false), never from
    transformers' interactive prompt."""
    trust = bool(cfg["model"].get("trust_remote_code", False))
    section = cfg.get("processor")
    if section:
        accepted = accepted_keywords(
            resolve_target(section["_target_"], "processor", extra_prefixes(cfg))
        )
        takes_it = accepted is None or "trust_remote_code" in accepted
        extra = (
            {"trust_remote_code": trust} if takes_it and "trust_remote_code" not in section else {}
        )
        processor = build(cfg, "processor", **extra)
    else:
        processor = load_processor(
            cfg["model"]["pretrained_model_name_or_path"], trust_remote_code=trust
        )
    notice = families.fix_chat_template(processor)
    if notice:
        print0(f"chat template: {notice}")
    return processor


def build_model(cfg: dict, freeze: FreezeConfig | None = None, device: torch.device | None = None):
    """The ``model`` section with LoRA (``peft``) applied.

    Args:
        cfg: the resolved config.
        freeze: the roles to freeze (``freeze_config``); None builds the bare architecture,
            e.g. to receive gathered weights.
        device: where the model goes; None leaves it where it loaded.
    """
    model = build(cfg, "model")
    if freeze is not None:
        apply_freeze(model, freeze)
    if cfg.get("peft"):
        model = apply_lora(model, build(cfg, "peft"))
    return model if device is None else model.to(device)


def build_dataset(
    cfg: dict,
    section: str,
    split: str | None = None,
    screen_dir=None,
    policy: DataCheckConfig | None = None,
):
    """The config's dataset ``section``.

    Args:
        split: replaces the section's ``split`` (``evaluate --split``); None keeps it.
        screen_dir: a training run's folder: the dataset is scanned for bad samples first
            under ``policy`` (``data_check``, see ``screen_dataset``) and recorded there.
    """
    node = cfg[section]
    if split is not None:
        node = {**copy.deepcopy(node), "split": split}
    dataset = instantiate(node, where=section, extra_prefixes=extra_prefixes(cfg))
    if screen_dir is None:
        return dataset
    return screen_dataset(dataset, section, screen_dir, policy)


def chat_template_kwargs(cfg: dict) -> dict | None:
    """``dataloader.collate_fn.chat_template_kwargs``: the chat template variables training
    renders with, which generation (preview, evaluation) uses too."""
    return ((cfg.get("dataloader") or {}).get("collate_fn") or {}).get("chat_template_kwargs")


def build_collate(cfg: dict, processor):
    """``dataloader.collate_fn`` with the processor bound; its other keys are kwargs."""
    node = cfg["dataloader"]["collate_fn"]
    fn = resolve_target(node["_target_"], "dataloader.collate_fn", extra_prefixes(cfg))
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    return functools.partial(fn, processor=processor, **kwargs)


def build_dataloader(
    cfg: dict,
    dataset,
    collate,
    *,
    train: bool,
    batch_size: int,
    rank: int,
    world_size: int,
    rng,
    processor=None,
):
    """The training loader (``dataloader``) or the validation one (``validation_dataloader``,
    else ``dataloader``).

    Args:
        dataset, collate: what the loader reads and how it batches.
        train: training (its sampler shuffles, resumably) or evaluation (every sample once).
        batch_size: the per-rank batch size.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        rng: the run's ``StatefulRNG``: the samplers' seed and the loader's generator.
        processor: for the length estimates of ``group_by_length``.
    """
    section = "dataloader" if train else "validation_dataloader"
    loader_cfg = cfg["dataloader"] if train else cfg.get(section) or cfg["dataloader"]
    node = {k: v for k, v in loader_cfg.items() if k != "collate_fn"}
    grouped, shuffle = node.pop("group_by_length", False), node.pop("shuffle", train)
    sampler = make_sampler(
        dataset,
        train=train,
        shuffle=shuffle,
        group_by_length=grouped,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=rng.base_seed,
        processor=processor,
    )
    if sampler is not None:
        node["sampler"] = sampler
    if not torch.cuda.is_available():
        node["pin_memory"] = False
    if train and node.get("num_workers", 0) > 0:
        # Workers kept across epochs: no process start-up (and empty prefetch queue) at the
        # start of every epoch, which the loop would otherwise wait out.
        node.setdefault("persistent_workers", True)
    if "worker_init_fn" in node:
        raise UsageError(
            f"{section}.worker_init_fn: automodel sets the workers' init function (they leave "
            "SIGTERM and SIGINT to the main process, which checkpoints); remove the key"
        )
    generator = torch.Generator().manual_seed(rng.seed + 1)
    return instantiate(
        node,
        dataset,
        where="dataloader",
        extra_prefixes=extra_prefixes(cfg),
        batch_size=batch_size,
        collate_fn=collate,
        generator=generator,
        worker_init_fn=IgnoreStopSignals(),
    )


def build_grad_accum(steps: StepSchedulerConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step: global / (local x data-parallel ranks)."""
    global_bs, local_bs = steps.global_batch_size, steps.local_batch_size
    if global_bs % (local_bs * dp_size):
        raise UsageError(
            f"step_scheduler.global_batch_size={global_bs} must be a multiple of "
            f"local_batch_size={local_bs} x {dp_size} data-parallel ranks"
        )
    return global_bs // (local_bs * dp_size)


def build_max_steps(steps: StepSchedulerConfig, num_samples: int) -> int:
    """``step_scheduler.max_steps``, else ``num_epochs`` (default 1) over ``num_samples``."""
    if steps.max_steps:
        return steps.max_steps
    epochs = steps.num_epochs or 1
    per_epoch = math.ceil(num_samples / steps.global_batch_size)
    return max(1, epochs * per_epoch)


def build_train_module(
    sections: FinetuneConfig,
    model: nn.Module,
    loss_fn,
    vision_loss,
    feed: BatchFeed,
    device: torch.device,
) -> nn.Module:
    """The module the loop calls (``TrainForward``: the language loss and ``vision_loss``),
    made data parallel over all processes (``distributed``).

    Args:
        sections: the config's typed sections (``distributed``, ``packing``, ``vision_cache``).
        model, loss_fn, vision_loss: the model and the loss terms the module computes.
        feed: the run's ``BatchFeed`` (its world size, blank image and unreached parameters).
        device: this process's device.
    """
    dist_cfg, world_size = sections.distributed, feed.world_size
    strategy = dist_cfg.strategy if world_size > 1 else "none"
    if world_size > 1 and strategy == "fsdp2" and sections.vision_cache.enabled:
        raise UsageError(
            "vision_cache with distributed.strategy=fsdp2 would skip the sharded tower's "
            "collectives on some ranks: use strategy ddp or turn the cache off"
        )
    blank_image_inputs = feed.blank_image_inputs(model)
    packer = None
    if sections.packing.enabled:
        packer = Packer(model, sections.packing.pack_length)
    module = TrainForward(model, loss_fn, blank_image_inputs, packer, vision_loss)
    mesh = None
    if strategy != "none":
        feed.freeze_unreached(module, model)
        vision_loss.reset()  # that probe was no training step
        mesh = build_mesh(device.type, world_size, dist_cfg.num_dp_ranks)
    dtypes = {k: parse_dtype(getattr(dist_cfg, k), f"distributed.{k}") for k in DTYPE_KEYS}
    module = parallelize(
        module,
        mesh,
        strategy,
        activation_checkpointing=dist_cfg.activation_checkpointing,
        cpu_offload=dist_cfg.cpu_offload,
        **dtypes,
    )
    if world_size > 1:
        print0(f"data parallel: {strategy} over {world_size} processes")
    return module
