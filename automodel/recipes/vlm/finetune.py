"""Fine-tuning a vision-language model: the recipe behind ``automodel finetune vlm``.

``setup()`` is the only code that reads the config; it builds every component through a
``build_*`` call. ``train()`` is the loop: batches -> forward -> loss -> backward -> step ->
log / validate / checkpoint, then ``final_model``. Rerunning the same command continues from the
newest step checkpoint, to the same result as a run never interrupted.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from automodel.config.instantiate import instantiate, resolve_target
from automodel.config.sections import DistributedConfig, FreezeConfig, StepSchedulerConfig
from automodel.datasets.checks import screen_dataset
from automodel.datasets.samplers import make_sampler
from automodel.distributed.env import (
    all_reduce_sum,
    any_rank,
    barrier,
    destroy,
    first_on_any_rank,
    full_tensor,
    init_distributed,
    loss_divisor,
)
from automodel.distributed.parallelize import (
    DTYPE_KEYS,
    build_mesh,
    dtype_of,
    freeze_unreached,
    gathered,
    gradient_sync,
    is_sharded,
    parallelize,
)
from automodel.errors import UsageError
from automodel.eval.periodic import build_periodic_evaluator
from automodel.generation import generate_reply, prompt_messages, reply_text
from automodel.loss.masked_ce import IGNORE_INDEX
from automodel.models.auto import load_processor
from automodel.models.compile import compile_model
from automodel.models.forward import (
    TrainForward,
    apply_precision,
    blank_image_sample,
    to_model,
    vision_inputs,
)
from automodel.models.freeze import apply_freeze, count_parameters, vision_modules
from automodel.models.packing import Packer
from automodel.models.vision_cache import build_vision_cache
from automodel.peft import apply_lora, is_peft_model, merge
from automodel.recipes.vlm.config import FinetuneConfig, resolve_config
from automodel.training.checkpoint import (
    FULL_ON_CPU,
    CheckpointManager,
    OptimizerState,
    changed_keys,
    check_writable,
    load_model_weights,
    load_saved_config,
    read_meta,
    save_config,
    save_hf_folder,
)
from automodel.training.guards import NonFiniteGuard
from automodel.training.host_memory import return_freed_memory
from automodel.training.loggers import build_sinks
from automodel.training.metrics import DataWait, MetricsLogger, peak_memory_gb, print0
from automodel.training.optim import build_optimizer
from automodel.training.plot import plot_losses
from automodel.training.schedule import build_lr_scheduler
from automodel.training.signals import RunStopped, StopOnSigterm, stop_reason
from automodel.training.state import collect_state, load_train_state, restore_state
from automodel.training.summary import run_summary

# The parts of the training state that differ between data-parallel ranks.
RANK_STATE = ("dataloader", "rng", "dropped_samples")


class FinetuneRecipeForVLM:
    """One fine-tuning run, from a resolved config to ``final_model``.

    ``self.cfg`` is the resolved config (saved as ``config.yaml``; the ``_target_`` sections are
    built from it); ``self.sections`` holds its plain sections typed.
    """

    def __init__(self, cfg: dict):
        self.cfg, self.notices = resolve_config(cfg)
        self.sections = FinetuneConfig.from_config(self.cfg)

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, sections = self.cfg, self.sections
        return_freed_memory()
        for notice in self.notices:
            print0(notice)
        self.extra_prefixes = tuple(cfg.get("allowed_target_prefixes") or ())
        self.dist = init_distributed(sections.dist_env)
        self.device = self.dist.device
        self.out_dir = check_writable(sections.checkpoint.checkpoint_dir)
        self.checkpoints = CheckpointManager(
            self.out_dir, sections.checkpoint.keep_last_n, sections.checkpoint.enabled
        )
        self.resume_dir = self.checkpoints.find_resume(sections.checkpoint.restore_from)
        if self.dist.is_main:
            save_config(cfg, self.out_dir)
        self.rng = self.build("rng")
        self.run_prepare(cfg.get("prepare") or [])

        self.model = self.build_model(cfg["model"], sections.freeze_config, cfg.get("peft"))
        self.vision_cache = build_vision_cache(self.model, sections.vision_cache)
        compile_model(self.model, sections.compile)
        self.processor = self.build_processor(cfg)
        self.collate = self.build_collate(cfg["dataloader"]["collate_fn"])
        self.loss_fn = self.build("loss_fn")
        self.train_module = self.build_parallel(sections.distributed)
        steps = sections.step_scheduler
        self.local_batch_size = steps.local_batch_size
        self.grad_accum = self.build_grad_accum(steps, self.dist.world_size)
        self.train_dataset = self.build_dataset("dataset")
        self.train_loader = self.build_dataloader(cfg["dataloader"], self.train_dataset, train=True)
        self.val_loader = None
        if cfg.get("validation_dataset"):
            self.val_dataset = self.build_dataset("validation_dataset")
            loader_cfg = cfg.get("validation_dataloader") or cfg["dataloader"]
            self.val_loader = self.build_dataloader(loader_cfg, self.val_dataset, train=False)
        self.max_steps = self.build_max_steps(steps, len(self.train_dataset))
        self.optimizer = build_optimizer(
            self.cfg["optimizer"], self.model, extra_prefixes=self.extra_prefixes
        )
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, self.max_steps, sections.lr_scheduler
        )
        self.vision_loss = self.build("vision_loss", self.model)  # weight 0: loss unchanged
        self.autocast_dtype = apply_precision(self.model, sections.precision, self.device)
        self.guard = NonFiniteGuard(steps.max_consecutive_nonfinite)
        self.step, self.epoch, self.dropped_samples = 0, 0, 0
        self.data_wait = DataWait(cfg["dataloader"].get("num_workers", 0))
        self.window = self.new_window()
        start = read_meta(self.resume_dir)["step"] if self.resume_dir else 0
        sinks = build_sinks(cfg, self.out_dir, start)
        self.logger = MetricsLogger(self.out_dir, self.max_steps, start, sinks)
        self.evaluator = build_periodic_evaluator(
            sections.eval,
            steps.eval_every_steps,
            self.processor,
            getattr(self, "val_dataset", None),
            self.out_dir,
            self.logger,
            start,
        )
        print0(
            run_summary(
                cfg=cfg,
                model_type=getattr(self.model.config, "model_type", None),
                train_samples=len(self.train_dataset),
                val_samples=len(self.val_dataset) if self.val_loader is not None else None,
                max_steps=self.max_steps,
                local_batch_size=self.local_batch_size,
                grad_accum=self.grad_accum,
                world_size=self.dist.world_size,
                parameters=self.parameter_counts,
                autocast_dtype=self.autocast_dtype,
                weight_dtype=next(self.model.parameters()).dtype,
                out_dir=self.out_dir,
            )
        )

    def build(self, section: str, *args: Any, **kwargs: Any) -> Any:
        return instantiate(
            self.cfg[section], *args, where=section, extra_prefixes=self.extra_prefixes, **kwargs
        )

    def build_dataset(self, section: str):
        """The section's dataset, scanned for bad samples before the first step (data_check)."""
        return screen_dataset(self.build(section), section, self.out_dir, self.sections.data_check)

    def run_prepare(self, steps: list) -> None:
        """Runs the config's ``prepare`` targets (e.g. building a tiny model or a dataset), once
        per node: the other processes wait for it."""
        if not isinstance(steps, list):
            raise UsageError("prepare must be a list of _target_ entries")
        if self.dist.local_rank == 0:
            for i, node in enumerate(steps):
                instantiate(node, where=f"prepare[{i}]", extra_prefixes=self.extra_prefixes)
        barrier()

    def build_parallel(self, dist_cfg: DistributedConfig) -> torch.nn.Module:
        """The module the loop calls, made data parallel over all processes (``distributed``)."""
        world_size = self.dist.world_size
        strategy = dist_cfg.strategy if world_size > 1 else "none"
        if world_size > 1 and self.cfg["vision_loss"].get("weight"):
            raise UsageError("vision_loss.weight > 0 runs in one process only; set it to 0")
        if world_size > 1 and strategy == "fsdp2" and self.sections.vision_cache.enabled:
            raise UsageError(
                "vision_cache with distributed.strategy=fsdp2 would skip the sharded tower's "
                "collectives on some ranks: use strategy ddp or turn the cache off"
            )
        blank = to_model(self.collate([blank_image_sample()]), self.model)
        blank_labels = blank.pop("labels")
        packing = self.sections.packing
        packer = None
        if packing.enabled:
            packer = Packer(self.model, packing.pack_length)
        module = TrainForward(
            self.model, self.loss_fn, vision_inputs(blank) if world_size > 1 else None, packer
        )
        if strategy != "none":
            unreached = freeze_unreached(module, blank, blank_labels)
            if unreached:
                print0(
                    f"frozen: {len(unreached)} parameters the loss never reaches (each rank must "
                    f"reduce the same gradients), e.g. {unreached[0].removeprefix('model.')}"
                )
        mesh = None
        if strategy != "none":
            mesh = build_mesh(self.device.type, world_size, dist_cfg.num_dp_ranks)
        dtypes = {k: dtype_of(getattr(dist_cfg, k), f"distributed.{k}") for k in DTYPE_KEYS}
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

    def build_model(self, model_cfg: dict, freeze: FreezeConfig, peft_cfg: dict | None):
        model = instantiate(model_cfg, where="model", extra_prefixes=self.extra_prefixes)
        apply_freeze(model, freeze)
        if peft_cfg:
            model = apply_lora(model, self.build("peft"))
        self.parameter_counts = count_parameters(model)
        return model.to(self.device)

    def build_processor(self, cfg: dict):
        if cfg.get("processor"):
            return self.build("processor")
        return load_processor(cfg["model"]["pretrained_model_name_or_path"])

    def build_collate(self, collate_cfg: dict):
        """The collate function with the processor bound; its other config keys are kwargs."""
        fn = resolve_target(collate_cfg["_target_"], "dataloader.collate_fn", self.extra_prefixes)
        kwargs = {k: v for k, v in collate_cfg.items() if k != "_target_"}
        return functools.partial(fn, processor=self.processor, **kwargs)

    def build_grad_accum(self, steps: StepSchedulerConfig, dp_size: int) -> int:
        """Micro-batches per optimizer step: global / (local x data-parallel ranks)."""
        global_bs, local_bs = steps.global_batch_size, steps.local_batch_size
        if global_bs % (local_bs * dp_size):
            raise UsageError(
                f"step_scheduler.global_batch_size={global_bs} must be a multiple of "
                f"local_batch_size={local_bs} x {dp_size} data-parallel ranks"
            )
        return global_bs // (local_bs * dp_size)

    def build_dataloader(self, loader_cfg: dict, dataset, train: bool):
        node = {k: v for k, v in loader_cfg.items() if k != "collate_fn"}
        grouped, shuffle = node.pop("group_by_length", False), node.pop("shuffle", train)
        sampler = make_sampler(
            dataset,
            train=train,
            shuffle=shuffle,
            group_by_length=grouped,
            batch_size=self.local_batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=self.rng.base_seed,
            processor=self.processor,
        )
        if sampler is not None:
            node["sampler"] = sampler
        if not torch.cuda.is_available():
            node["pin_memory"] = False
        if train and node.get("num_workers", 0) > 0:
            # Workers kept across epochs: no process start-up (and empty prefetch queue) at the
            # start of every epoch, which the loop would otherwise wait out.
            node.setdefault("persistent_workers", True)
        generator = torch.Generator().manual_seed(self.rng.seed + 1)
        return instantiate(
            node,
            dataset,
            where="dataloader",
            extra_prefixes=self.extra_prefixes,
            batch_size=self.local_batch_size,
            collate_fn=self.collate,
            generator=generator,
        )

    def build_max_steps(self, steps: StepSchedulerConfig, num_samples: int) -> int:
        if steps.max_steps:
            return steps.max_steps
        epochs = steps.num_epochs or 1
        per_epoch = math.ceil(num_samples / steps.global_batch_size)
        return max(1, epochs * per_epoch)

    # ----------------------------------------------------------------------------- training
    def batches(self, loader) -> Iterator[dict]:
        """Endless batches, epoch after epoch; batches whose samples were all dropped are skipped
        (under data parallelism they become a batch without labels, so every rank takes part in
        every step's collectives).

        A loader restored at the end of an epoch yields nothing once, then the next epoch.
        """
        resumed = self.step > 0
        while True:
            produced = False
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(self.epoch)
            for batch in loader:
                if batch is None and self.dist.world_size > 1:
                    batch = self.idle_batch()
                if batch is None:
                    continue
                self.window["images"] += batch.pop("num_images", 0)
                for name, why in batch.pop("dropped", []):
                    self.dropped_samples += 1
                    self.logger.write(f"dropped sample {name}: {why}")
                produced = True
                yield batch
            if not produced and not resumed:
                raise UsageError(
                    "the training dataset yields no usable sample (see dropped samples above)"
                )
            resumed = False
            self.epoch += 1

    def idle_batch(self) -> dict:
        """One blank-image sample with no label: a micro-batch that changes nothing."""
        batch = self.collate([blank_image_sample()])
        batch["labels"].fill_(IGNORE_INDEX)
        batch["num_images"] = 0
        return batch

    def forward_loss(self, batch: dict, divisor) -> torch.Tensor:
        """Loss for one micro-batch: its summed token losses over ``divisor``."""
        labels = batch.pop("labels")
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, self.autocast_dtype, enabled=enabled):
            loss = self.train_module(batch, labels, divisor)
        return self.vision_loss(loss, batch, labels, divisor)

    def train(self) -> Path:
        """Runs the remaining steps, then writes ``final_model`` and ``loss.png``.

        Raises:
            RunStopped: SIGTERM, too many non-finite steps in a row, or a failed checkpoint save.
        """
        if self.resume_dir is not None:
            # Here rather than in setup(): nothing may draw random numbers after the restore.
            self.restore(self.resume_dir)
        try:
            with StopOnSigterm() as sigterm:
                self.train_steps(sigterm)
        finally:
            self.logger.close()
        if self.dropped_samples:
            print0(f"{self.dropped_samples} samples were dropped during training (reasons above)")
        if self.guard.skipped_steps:
            print0(f"{self.guard.skipped_steps} steps were skipped (non-finite loss or grad norm)")
        final = self.out_dir / "final_model"
        model = self.unsharded_model()
        if self.dist.is_main:
            if is_peft_model(model):
                adapter = save_hf_folder(model, self.processor, self.out_dir / "final_adapter")
                print0(f"saved {adapter}")
                model = merge(model)  # final_model is the merged, ordinary model
            save_hf_folder(model, self.processor, final)
            print0(f"saved {final}")
            picture = plot_losses(self.out_dir)
            if picture is not None:
                print0(f"saved {picture}")
            self.preview(model)
        barrier()
        return final

    def unsharded_model(self):
        """The trained model whole, on rank 0 (None on the others; every rank must call this).

        Without FSDP2 every rank holds it already. Under FSDP2 the shards are gathered into a
        fresh copy of the model built from the config on rank 0's CPU.
        """
        if not is_sharded(self.train_module):
            return self.model
        state = get_model_state_dict(self.model, options=FULL_ON_CPU)
        if not self.dist.is_main:
            return None
        model = instantiate(self.cfg["model"], where="model", extra_prefixes=self.extra_prefixes)
        if self.cfg.get("peft"):
            model = apply_lora(model, self.build("peft"))
        model.load_state_dict(state, strict=True)
        return model

    def train_steps(self, sigterm: StopOnSigterm) -> None:
        steps = self.sections.step_scheduler
        log_every, val_every = steps.log_every_steps, steps.val_every_steps
        ckpt_every = steps.ckpt_every_steps
        max_norm = self.sections.clip_grad_norm.max_norm or float("inf")
        params = [p for p in self.model.parameters() if p.requires_grad]
        train_batches = self.batches(self.train_loader)
        if self.val_loader is not None and self.step == 0:
            self.validate_and_log(0)

        self.set_train_mode()
        window_start = time.perf_counter()
        while self.step < self.max_steps:
            self.step += 1
            step = self.step
            fetched = self.data_wait.take(train_batches, self.grad_accum)
            micro = [to_model(batch, self.model) for batch in fetched]
            num_label_tokens = sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in micro)
            # Summed token losses over (global label tokens / ranks): the ranks' averaged
            # gradients equal those of one process with the whole global batch.
            divisor = loss_divisor(num_label_tokens, self.dist.world_size)
            step_loss = torch.zeros((), device=self.device)
            for i, mb in enumerate(micro):
                self.window["tokens"] += mb["attention_mask"].sum()
                with gradient_sync(self.train_module, enabled=i == len(micro) - 1):
                    loss = self.forward_loss(mb, divisor)
                    loss.backward()
                step_loss += loss.detach()
            step_loss = all_reduce_sum(step_loss) / self.dist.world_size
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if self.guard.check(step_loss, grad_norm):
                self.optimizer.step()
                self.lr_scheduler.step()
                self.window["loss"] += step_loss
                self.window["steps"] += 1
            else:
                self.logger.write(f"step {step}: non-finite loss or grad norm, update skipped")
            self.optimizer.zero_grad(set_to_none=True)
            self.logger.advance()

            if step % log_every == 0 or step == self.max_steps:
                self.log_window(step, grad_norm, time.perf_counter() - window_start)
                window_start = time.perf_counter()
            val_loss = None
            if self.val_loader is not None and (
                step == self.max_steps or (val_every and step % val_every == 0)
            ):
                val_loss = self.validate_and_log(step)
            is_best = False
            if self.evaluator is not None and self.evaluator.due(step):
                with gathered(self.train_module):  # every rank generates the same replies
                    _, is_best = self.evaluator.run(self.model, step)
                self.set_train_mode()
            stop = first_on_any_rank(stop_reason(sigterm, self.guard))
            due = ckpt_every and (step % ckpt_every == 0 or step == self.max_steps)
            if stop or due or is_best:  # a new best eval score gets a checkpoint BEST names
                saved = self.checkpoints.save(
                    step, self.model, self.train_state(), self.cfg, val_loss, best=is_best
                )
                if saved is not None:
                    self.logger.write(f"saved checkpoint {saved}")
            if stop:
                hint = self.checkpoints.resume_hint(step)
                raise RunStopped(f"{stop[0]} at step {step}; {hint}", stop[1])

    def new_window(self) -> dict:
        """Sums over the steps since the last log line."""
        zero = torch.zeros((), device=self.device)
        return {"loss": zero, "steps": 0, "tokens": zero.clone(), "images": 0}

    def log_window(self, step: int, grad_norm: torch.Tensor, seconds: float) -> None:
        # The only host syncs of the loop besides the finiteness check happen here.
        window = self.window
        data_wait_pct, hint = self.data_wait.end_window(seconds)
        tokens = all_reduce_sum(window["tokens"].float())  # throughput of all ranks
        images = all_reduce_sum(torch.tensor(float(window["images"]), device=self.device))
        self.logger.log_train(
            step,
            {
                "loss": float(window["loss"]) / window["steps"] if window["steps"] else math.nan,
                "lr": self.lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": float(tokens) / seconds,
                "images_per_s": float(images) / seconds,
                "data_wait_pct": data_wait_pct,
                "peak_memory_gb": peak_memory_gb(self.device),
                "skipped_steps": self.guard.skipped_steps,
                "epoch": self.epoch,
                **self.vision_loss.metrics(),  # language_loss, vision_loss when weighted
            },
        )
        self.window = self.new_window()
        if hint:
            self.logger.write(hint)

    # ----------------------------------------------------------------------------- checkpoints
    def stateful(self) -> dict[str, Any]:
        """Everything with a state_dict that a resumed run must get back."""
        return {
            "optimizer": OptimizerState(self.model, self.optimizer),  # gathered under FSDP2
            "lr_scheduler": self.lr_scheduler,
            "dataloader": self.train_loader,
            "rng": self.rng,
            "guard": self.guard,
        }

    def train_state(self) -> dict:
        """The state to save; a rank other than 0 keeps only its own part (RANK_STATE)."""
        state = collect_state(
            self.stateful(),
            step=self.step,
            epoch=self.epoch,
            dropped_samples=self.dropped_samples,
            window={"loss": self.window["loss"].cpu(), "steps": self.window["steps"]},
        )
        if not self.dist.is_main:
            state = {k: v for k, v in state.items() if k in RANK_STATE}
        return state

    def restore(self, step_dir: Path) -> None:
        """Loads weights strictly and the whole training state from a step checkpoint."""
        saved_world = read_meta(step_dir).get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise UsageError(
                f"{step_dir} was written by {saved_world} processes: resume it with "
                f"--nproc-per-node {saved_world} (each process's data position is saved)"
            )
        load_model_weights(self.model, step_dir)
        rest = restore_state(self.stateful(), load_train_state(step_dir, self.dist.rank))
        self.step, self.epoch = rest["step"], rest["epoch"]
        self.dropped_samples = rest["dropped_samples"]
        self.window["loss"] = rest["window"]["loss"].to(self.device)
        self.window["steps"] = rest["window"]["steps"]
        print0(f"resuming from {step_dir} at step {self.step}/{self.max_steps}")
        saved_cfg = load_saved_config(step_dir)
        for change in changed_keys(saved_cfg, self.cfg):
            print0(f"note: changed since the checkpoint: {change}")

    def set_train_mode(self) -> None:
        self.model.train()
        # A frozen tower stays in eval mode so its output does not change from step to step.
        for module in vision_modules(self.model):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    @torch.no_grad()
    def validate(self) -> dict:
        """Token-weighted loss over the validation set (or its first ``val_batches``)."""
        self.model.eval()
        limit = self.sections.step_scheduler.val_batches
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = torch.zeros((), device=self.device, dtype=torch.float64)
        loader, end = iter(self.val_loader), object()
        for i in itertools.count():
            batch = next(loader, end) if limit is None or i < limit else end
            # Ranks hold different numbers of batches: one that has run out runs batches
            # without labels until all have, so every forward's collectives have partners.
            if not any_rank(batch is not end):
                break
            if batch is end or batch is None:
                if self.dist.world_size == 1:
                    continue
                batch = self.idle_batch()
            batch = to_model(batch, self.model)
            tokens += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            total += self.forward_loss(batch, 1).double()
        total, tokens = all_reduce_sum(total), int(all_reduce_sum(tokens))
        return {"val_loss": float(total) / max(1, tokens), "val_tokens": tokens}

    def validate_and_log(self, step: int) -> float:
        metrics = self.validate()
        self.logger.log_validation(step, metrics)
        self.set_train_mode()
        return metrics["val_loss"]

    def preview(self, model) -> None:
        """Prints the model's reply for the first validation samples next to the reference."""
        preview = self.sections.preview
        dataset = getattr(self, "val_dataset", None)
        if not preview.num_samples or dataset is None:
            return
        for i in range(min(preview.num_samples, len(dataset))):
            conversation = dataset[i]["conversation"]
            prediction = generate_reply(
                model, self.processor, prompt_messages(conversation), preview.max_new_tokens
            )
            print0(f"validation sample {i}")
            print0(f"  reference:  {reply_text(conversation[-1])}")
            print0(f"  prediction: {prediction}")


def run(cfg: dict) -> Path:
    """Builds the recipe from a config, trains, and returns the ``final_model`` folder."""
    recipe = FinetuneRecipeForVLM(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        destroy()
