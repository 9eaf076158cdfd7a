"""Fine-tuning a vision-language model: the recipe behind ``automodel finetune vlm``.

``setup()`` is the only code that reads the config; it builds every component through named
``build_*`` calls (``recipes/vlm/builders.py``, shared with ``data check`` and ``evaluate``).
``train()`` is the loop: batches -> forward and loss -> backward -> step -> log / validate /
evaluate / checkpoint, then ``final_model``. Rerunning the same command continues from the
newest step checkpoint, to the same result as a run never interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from automodel.common import IGNORE_INDEX, print0
from automodel.config.sections import CheckpointConfig
from automodel.distributed.env import (
    all_ranks_error,
    all_reduce_sum,
    barrier,
    destroy,
    first_on_any_rank,
    full_tensor,
    init_distributed,
    loss_divisor,
)
from automodel.distributed.parallelize import gathered, gradient_sync, is_sharded, reshard
from automodel.errors import RunStopped, UsageError
from automodel.eval.periodic import build_periodic_evaluator
from automodel.models.compile import compile_model
from automodel.models.forward import apply_precision, autocast_dtype, to_model
from automodel.models.freeze import count_parameters, vision_modules
from automodel.models.vision_cache import build_vision_cache
from automodel.recipes.vlm.builders import (
    build,
    build_collate,
    build_dataloader,
    build_dataset,
    build_grad_accum,
    build_max_steps,
    build_model,
    build_processor,
    build_train_module,
    chat_template_kwargs,
    extra_prefixes,
    run_prepare,
)
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
)
from automodel.training.feed import BatchFeed
from automodel.training.guards import NonFiniteGuard
from automodel.training.host_memory import return_freed_memory
from automodel.training.loggers import build_sinks
from automodel.training.metrics import DataWait, MetricsLogger, peak_memory_gb
from automodel.training.optim import build_optimizer
from automodel.training.outputs import preview, save_final
from automodel.training.run_lock import RunLock
from automodel.training.schedule import build_lr_scheduler
from automodel.training.signals import StopOnSignal, stop_reason
from automodel.training.state import collect_state, load_train_state, restore_state
from automodel.training.summary import run_summary
from automodel.training.window import LogWindow

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
        self.lock: RunLock | None = None  # rank 0's hold on checkpoint_dir

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, sections = self.cfg, self.sections
        return_freed_memory()
        for notice in self.notices:
            print0(notice)
        self.dist = init_distributed(sections.dist_env)
        self.device = self.dist.device
        # Before anything loads: bf16 / fp16 autocast on a CPU without native kernels is refused.
        self.autocast_dtype = autocast_dtype(sections.precision.autocast, self.device)
        self.setup_run_folder(sections.checkpoint)
        self.rng = build(cfg, "rng")
        run_prepare(cfg, self.dist.local_rank)

        self.model = build_model(cfg, sections.freeze_config, self.device)
        self.vision_cache = build_vision_cache(self.model, sections.vision_cache)
        compile_model(self.model, sections.compile)
        self.processor = build_processor(cfg)
        self.collate = build_collate(cfg, self.processor)
        self.feed = BatchFeed(self.collate, self.dist.world_size)
        self.loss_fn = build(cfg, "loss_fn")
        self.vision_loss = build(cfg, "vision_loss")  # weight 0: loss unchanged
        self.train_module = build_train_module(
            sections, self.model, self.loss_fn, self.vision_loss, self.feed, self.device
        )
        steps = sections.step_scheduler
        self.local_batch_size = steps.local_batch_size
        self.grad_accum = build_grad_accum(steps, self.dist.world_size)
        self.setup_data()
        self.max_steps = build_max_steps(steps, len(self.train_dataset))
        self.optimizer = build_optimizer(
            cfg["optimizer"], self.model, extra_prefixes=extra_prefixes(cfg)
        )
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, self.max_steps, sections.lr_scheduler
        )
        apply_precision(self.model, sections.precision, self.autocast_dtype, self.device)
        self.guard = NonFiniteGuard(steps.max_consecutive_nonfinite)
        self.step = 0
        self.data_wait = DataWait(cfg["dataloader"].get("num_workers", 0))
        self.window = LogWindow(self.device)
        self.setup_logging()
        print0(self.summary())

    def summary(self) -> str:
        """The run's opening lines: model and family, data, steps, batch, parameters, precision,
        where results go."""
        return run_summary(
            cfg=self.cfg,
            model_type=getattr(self.model.config, "model_type", None),
            train_samples=len(self.train_dataset),
            val_samples=len(self.val_dataset) if self.val_dataset is not None else None,
            max_steps=self.max_steps,
            local_batch_size=self.local_batch_size,
            grad_accum=self.grad_accum,
            world_size=self.dist.world_size,
            parameters=count_parameters(self.model),
            autocast_dtype=self.autocast_dtype,
            weight_dtype=next(self.model.parameters()).dtype,
            out_dir=self.out_dir,
        )

    def setup_run_folder(self, checkpoint: CheckpointConfig) -> None:
        """The run's folder (``checkpoint_dir``, locked for this run), its checkpoints, the one to
        resume from, and the resolved config saved there."""
        self.out_dir = check_writable(checkpoint.checkpoint_dir)
        error = None
        if self.dist.is_main:  # one run per folder, held by its rank 0
            try:
                self.lock = RunLock(self.out_dir)
            except UsageError as e:
                error = str(e)
        error = all_ranks_error(error)
        if error:
            raise UsageError(error)
        self.checkpoints = CheckpointManager(
            self.out_dir, checkpoint.keep_last_n, checkpoint.enabled
        )
        self.resume_dir = self.checkpoints.find_resume(checkpoint.restore_from)
        if self.dist.is_main:
            save_config(self.cfg, self.out_dir)

    def setup_data(self) -> None:
        """The training and validation datasets (screened for bad samples) and their loaders."""
        policy = self.sections.data_check
        self.train_dataset = build_dataset(
            self.cfg, "dataset", screen_dir=self.out_dir, policy=policy
        )
        self.train_loader = self.build_dataloader(self.train_dataset, train=True)
        self.val_dataset = self.val_loader = None
        if self.cfg.get("validation_dataset"):
            self.val_dataset = build_dataset(
                self.cfg, "validation_dataset", screen_dir=self.out_dir, policy=policy
            )
            self.val_loader = self.build_dataloader(self.val_dataset, train=False)

    def build_dataloader(self, dataset, train: bool):
        return build_dataloader(
            self.cfg,
            dataset,
            self.collate,
            train=train,
            batch_size=self.local_batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            rng=self.rng,
            processor=self.processor,
        )

    def setup_logging(self) -> None:
        """The metrics logger and its sinks, and the periodic evaluator, from the resumed step."""
        start = read_meta(self.resume_dir)["step"] if self.resume_dir else 0
        sinks = build_sinks(self.cfg, self.out_dir, start)
        self.logger = MetricsLogger(self.out_dir, self.max_steps, start, sinks)
        self.evaluator = build_periodic_evaluator(
            self.sections.eval,
            self.sections.step_scheduler.eval_every_steps,
            self.processor,
            self.val_dataset,
            self.out_dir,
            self.logger,
            start,
            chat_template_kwargs(self.cfg),
        )

    # ----------------------------------------------------------------------------- training
    def train(self) -> Path:
        """Runs the remaining steps, then writes ``final_model`` and ``loss.png``.

        Raises:
            RunStopped: SIGTERM or SIGINT, too many non-finite steps in a row, or a failed checkpoint save.
        """
        if self.resume_dir is not None:
            # Here rather than in setup(): nothing may draw random numbers after the restore.
            self.restore(self.resume_dir)
        try:
            with StopOnSignal() as stop_signal:
                self.train_steps(stop_signal)
        finally:
            self.logger.close()
        if self.feed.dropped_samples:
            print0(
                f"{self.feed.dropped_samples} samples were dropped during training (reasons above)"
            )
        if self.guard.skipped_steps:
            print0(f"{self.guard.skipped_steps} steps were skipped (non-finite loss or grad norm)")
        if self.vision_cache is not None:
            print0(self.vision_cache.report(self.vision_cache_counts()))
        return self.save_final()

    def train_steps(self, stop_signal: StopOnSignal) -> None:
        """The loop: one optimizer step at a time until ``max_steps`` or a stop request."""
        steps = self.sections.step_scheduler
        batches = self.feed.batches(self.train_loader, self.step > 0, self.logger.write)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.val_loader is not None and self.step == 0:
            self.validate_and_log(0)
        self.set_train_mode()
        self.window.start_clock()
        while self.step < self.max_steps:
            self.step += 1
            step = self.step
            grad_norm = self.train_step(batches, trainable)
            self.logger.advance()
            if step % steps.log_every_steps == 0 or step == self.max_steps:
                self.log_window(step, grad_norm)
            val_loss = None
            val_every = steps.val_every_steps
            if self.val_loader is not None and (
                step == self.max_steps or self.is_due(step, val_every)
            ):
                val_loss = self.validate_and_log(step)
            is_best = self.evaluate(step)
            stop = first_on_any_rank(stop_reason(stop_signal, self.guard))
            if stop or is_best or self.is_due(step, steps.ckpt_every_steps):
                self.save_checkpoint(step, val_loss, is_best)  # a new best eval score: BEST
            if stop:
                hint = self.checkpoints.resume_hint(step)
                raise RunStopped(f"{stop[0]} at step {step}; {hint}", stop[1])

    def is_due(self, step: int, every: int | None) -> bool:
        """Every ``every`` steps and at the last step; never when ``every`` is not set."""
        return bool(every) and (step % every == 0 or step == self.max_steps)

    def train_step(self, batches, trainable: list[torch.nn.Parameter]) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the gradient norm."""
        micro = [to_model(b, self.model) for b in self.data_wait.take(batches, self.grad_accum)]
        num_label_tokens = sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in micro)
        # Summed token losses over (global label tokens / ranks): the ranks' averaged
        # gradients equal those of one process with the whole global batch.
        divisor = loss_divisor(num_label_tokens, self.dist.world_size)
        step_loss = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro):
            self.window.add_tokens(mb["attention_mask"])
            with gradient_sync(self.train_module, enabled=i == len(micro) - 1):
                loss = self.forward_loss(mb, divisor)
                loss.backward()
            step_loss += loss.detach()
        step_loss = all_reduce_sum(step_loss) / self.dist.world_size
        max_norm = self.sections.clip_grad_norm.max_norm or float("inf")
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
        if self.guard.check(step_loss, grad_norm):
            self.optimizer.step()
            self.lr_scheduler.step()
            self.window.add_step(step_loss)
        else:
            self.logger.write(f"step {self.step}: non-finite loss or grad norm, update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def forward_loss(self, batch: dict, divisor) -> torch.Tensor:
        """Loss for one micro-batch: its summed token losses over ``divisor``, every term
        computed inside the data-parallel module."""
        labels = batch.pop("labels")
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, self.autocast_dtype, enabled=enabled):
            return self.train_module(batch, labels, divisor)

    def set_train_mode(self) -> None:
        self.model.train()
        # A frozen tower stays in eval mode so its output does not change from step to step.
        for module in vision_modules(self.model):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    def log_window(self, step: int, grad_norm: torch.Tensor) -> None:
        # The only host syncs of the loop besides the finiteness check happen here.
        window = self.window.close(self.feed.take_images())  # every rank's throughput
        data_wait_pct, hint = self.data_wait.end_window(window.pop("seconds"))
        self.logger.log_train(
            step,
            {
                "loss": window["loss"],
                "lr": self.lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": window["tokens_per_s"],
                "images_per_s": window["images_per_s"],
                "data_wait_pct": data_wait_pct,
                "peak_memory_gb": peak_memory_gb(self.device),
                "skipped_steps": self.guard.skipped_steps,
                "epoch": self.feed.epoch,
                # language_loss and vision_loss of every rank, when vision_loss is weighted
                **self.vision_loss.metrics(all_reduce_sum, self.device),
                **self.vision_cache_metrics(),
            },
        )
        if hint:
            self.logger.write(hint)
        self.window.start_clock()

    def vision_cache_counts(self) -> list[int]:
        """The vision cache's hits, computed, stored and stored bytes since this process
        started, summed over ranks (every rank must call this)."""
        counts = torch.tensor(self.vision_cache.counts(), device=self.device, dtype=torch.int64)
        return all_reduce_sum(counts).tolist()

    def vision_cache_metrics(self) -> dict:
        """``vision_cache_hits`` and ``vision_cache_computed`` for the log (none without a
        cache)."""
        if self.vision_cache is None:
            return {}
        hits, computed, _, _ = self.vision_cache_counts()
        return {"vision_cache_hits": hits, "vision_cache_computed": computed}

    # ----------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict:
        """Token-weighted loss over the validation set (or its first ``val_batches``)."""
        self.model.eval()
        limit = self.sections.step_scheduler.val_batches
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = torch.zeros((), device=self.device, dtype=torch.float64)
        for batch in self.feed.validation_batches(self.val_loader, limit):
            batch = to_model(batch, self.model)
            tokens += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            total += self.forward_loss(batch, 1).double()
        reshard(self.train_module)
        total, tokens = all_reduce_sum(total), int(all_reduce_sum(tokens))
        return {"val_loss": float(total) / max(1, tokens), "val_tokens": tokens}

    def validate_and_log(self, step: int) -> float:
        metrics = self.validate()
        self.logger.log_validation(step, metrics)
        self.set_train_mode()
        return metrics["val_loss"]

    def evaluate(self, step: int) -> bool:
        """Task metrics when ``eval_every_steps`` is due; whether they reached a new best."""
        if self.evaluator is None or not self.evaluator.due(step):
            return False
        with gathered(self.train_module):  # every rank generates the same replies
            _, is_best = self.evaluator.run(self.model, step)
        self.set_train_mode()
        return is_best

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
            epoch=self.feed.epoch,
            dropped_samples=self.feed.dropped_samples,
            window=self.window.state_dict(),
        )
        if not self.dist.is_main:
            state = {k: v for k, v in state.items() if k in RANK_STATE}
        return state

    def save_checkpoint(self, step: int, val_loss: float | None, is_best: bool) -> None:
        saved = self.checkpoints.save(
            step, self.model, self.train_state(), self.cfg, val_loss, best=is_best
        )
        if saved is not None:
            self.logger.write(f"saved checkpoint {saved}")

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
        self.step, self.feed.epoch = rest["step"], rest["epoch"]
        self.feed.dropped_samples = rest["dropped_samples"]
        self.window.load_state_dict(rest["window"])
        print0(f"resuming from {step_dir} at step {self.step}/{self.max_steps}")
        for change in changed_keys(load_saved_config(step_dir), self.cfg):
            print0(f"note: changed since the checkpoint: {change}")

    # ----------------------------------------------------------------------------- outputs
    def save_final(self) -> Path:
        """``final_model`` (and ``final_adapter``, ``loss.png``, the preview) from rank 0."""
        model = self.unsharded_model()
        if self.dist.is_main:
            model = save_final(model, self.processor, self.out_dir)
            settings = self.sections.preview
            preview(
                model,
                self.processor,
                self.val_dataset,
                settings.num_samples,
                settings.max_new_tokens,
                chat_template_kwargs(self.cfg),
            )
        barrier()
        return self.out_dir / "final_model"

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
        model = build_model(self.cfg)  # unfrozen, as the weights it receives
        model.load_state_dict(state, strict=True)
        return model


def run(cfg: dict) -> Path:
    """Builds the recipe from a config, trains, and returns the ``final_model`` folder."""
    recipe = FinetuneRecipeForVLM(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        if recipe.lock is not None:
            recipe.lock.release()
        destroy()
