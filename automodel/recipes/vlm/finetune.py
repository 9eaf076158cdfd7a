"""Fine-tuning a vision-language model: the recipe behind ``automodel finetune vlm``.

``setup()`` is the only code that reads the config; it builds every component through a
``build_*`` call. ``train()`` is the loop: batches -> forward -> loss -> backward -> step ->
log / validate, then ``final_model``.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from automodel.config.compat import DEFAULT_COLLATE, translate_seed_layout
from automodel.config.instantiate import instantiate, resolve_target
from automodel.config.loader import dump_yaml
from automodel.config.validate import Schema, validate_config
from automodel.errors import UsageError
from automodel.generation import generate_reply, prompt_messages, reply_text
from automodel.loss.masked_ce import IGNORE_INDEX
from automodel.models.auto import load_processor
from automodel.models.forward import label_logits
from automodel.models.freeze import apply_freeze, count_parameters, vision_modules
from automodel.training.checkpoint import check_writable, save_config, save_hf_folder
from automodel.training.metrics import MetricsLogger, peak_memory_gb, print0
from automodel.training.schedule import build_lr_scheduler

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
        "precision": {"autocast": str},
        "checkpoint": {
            "enabled": bool,
            "checkpoint_dir": str,
            "model_save_format": str,
            "save_consolidated": bool,
        },
        "preview": {"num_samples": int, "max_new_tokens": int},
    },
    noticed={
        "dist_env": "dist_env is accepted and ignored: this run uses one process",
        "distributed": "distributed is accepted and ignored: this run uses one process",
    },
    top_level={"allowed_target_prefixes": list, "prepare": list},
)

DEFAULTS = {
    "dataloader": {"_target_": "torchdata.stateful_dataloader.StatefulDataLoader"},
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-5, "weight_decay": 0.01},
    "loss_fn": {"_target_": "automodel.loss.MaskedCrossEntropy"},
    "rng": {"_target_": "automodel.training.rng.StatefulRNG", "seed": 42},
    "step_scheduler": {"global_batch_size": 8, "local_batch_size": 1, "log_every_steps": 1},
    "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "cosine", "min_lr": 0.0},
    "freeze_config": {"freeze_vision_tower": True},
    "clip_grad_norm": {"max_norm": 1.0},
    "precision": {"autocast": "auto"},
    "checkpoint": {"checkpoint_dir": "checkpoints"},
    "preview": {"num_samples": 0, "max_new_tokens": 128},
}


def resolve_config(cfg: dict) -> tuple[dict, list[str]]:
    """Translates the tutorial's layout, fills defaults and validates.

    Returns:
        The resolved config and the notices to print.
    """
    if cfg.get("peft"):
        raise UsageError("peft: LoRA is not available in this version; remove the peft section")
    resolved = translate_seed_layout(copy.deepcopy(cfg))
    for section, defaults in DEFAULTS.items():
        node = resolved.setdefault(section, {})
        if not isinstance(node, dict):
            raise UsageError(f"{section} must be a section of keys, got {node!r}")
        for key, value in defaults.items():
            node.setdefault(key, copy.deepcopy(value))
    collate = resolved["dataloader"].setdefault("collate_fn", {"_target_": DEFAULT_COLLATE})
    collate.setdefault("_target_", DEFAULT_COLLATE)
    notices = validate_config(resolved, SCHEMA)
    if resolved["step_scheduler"].get("ckpt_every_steps"):
        notices.append(
            "note: step_scheduler.ckpt_every_steps is accepted, but this version writes only "
            "final_model at the end of the run"
        )
    return resolved, notices


class FinetuneRecipeForVLM:
    """One fine-tuning run, from a resolved config to ``final_model``."""

    def __init__(self, cfg: dict):
        self.cfg, self.notices = resolve_config(cfg)

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        print0("resolved config:\n" + dump_yaml(cfg))
        for notice in self.notices:
            print0(notice)
        self.extra_prefixes = tuple(cfg.get("allowed_target_prefixes") or ())
        self.out_dir = check_writable(cfg["checkpoint"]["checkpoint_dir"])
        save_config(cfg, self.out_dir)
        self.rng = self.build("rng")
        self.run_prepare(cfg.get("prepare") or [])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        self.model = self.build_model(cfg["model"], cfg["freeze_config"])
        self.processor = self.build_processor(cfg)
        self.collate = self.build_collate(cfg["dataloader"]["collate_fn"])
        steps = cfg["step_scheduler"]
        self.local_batch_size = steps["local_batch_size"]
        self.grad_accum = self.build_grad_accum(steps)
        self.train_dataset = self.build("dataset")
        self.train_loader = self.build_dataloader(
            cfg["dataloader"], self.train_dataset, shuffle=True
        )
        self.val_loader = None
        if cfg.get("validation_dataset"):
            self.val_dataset = self.build("validation_dataset")
            loader_cfg = cfg.get("validation_dataloader") or cfg["dataloader"]
            self.val_loader = self.build_dataloader(loader_cfg, self.val_dataset, shuffle=False)
        self.max_steps = self.build_max_steps(steps, len(self.train_dataset))
        self.optimizer = self.build(
            "optimizer", [p for p in self.model.parameters() if p.requires_grad]
        )
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, self.max_steps, **cfg["lr_scheduler"]
        )
        self.loss_fn = self.build("loss_fn")
        self.autocast_dtype = self.build_autocast(cfg["precision"]["autocast"])
        self.logger = MetricsLogger(self.out_dir, self.max_steps)

    def build(self, section: str, *args: Any, **kwargs: Any) -> Any:
        return instantiate(
            self.cfg[section], *args, where=section, extra_prefixes=self.extra_prefixes, **kwargs
        )

    def run_prepare(self, steps: list) -> None:
        """Runs the config's ``prepare`` targets (e.g. building a tiny model or a dataset)."""
        if not isinstance(steps, list):
            raise UsageError("prepare must be a list of _target_ entries")
        for i, node in enumerate(steps):
            instantiate(node, where=f"prepare[{i}]", extra_prefixes=self.extra_prefixes)

    def build_model(self, model_cfg: dict, freeze_cfg: dict) -> torch.nn.Module:
        model = instantiate(model_cfg, where="model", extra_prefixes=self.extra_prefixes)
        apply_freeze(model, **freeze_cfg)
        trainable, total = count_parameters(model)
        print0(
            f"parameters: {trainable:,} trainable / {total:,} total "
            f"({100 * trainable / max(1, total):.1f}%)"
        )
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

    def build_grad_accum(self, steps: dict) -> int:
        global_bs, local_bs = steps["global_batch_size"], steps["local_batch_size"]
        if global_bs % local_bs:
            raise UsageError(
                f"step_scheduler.global_batch_size={global_bs} must be a multiple of "
                f"local_batch_size={local_bs}"
            )
        return global_bs // local_bs

    def build_dataloader(self, loader_cfg: dict, dataset, shuffle: bool):
        node = {k: v for k, v in loader_cfg.items() if k != "collate_fn"}
        node.setdefault("_target_", DEFAULTS["dataloader"]["_target_"])
        node.setdefault("shuffle", shuffle)
        if not torch.cuda.is_available():
            node["pin_memory"] = False
        generator = torch.Generator().manual_seed(self.rng.seed)
        return instantiate(
            node,
            dataset,
            where="dataloader",
            extra_prefixes=self.extra_prefixes,
            batch_size=self.local_batch_size,
            collate_fn=self.collate,
            generator=generator,
        )

    def build_max_steps(self, steps: dict, num_samples: int) -> int:
        if steps.get("max_steps"):
            return steps["max_steps"]
        epochs = steps.get("num_epochs") or 1
        per_epoch = math.ceil(num_samples / steps["global_batch_size"])
        return max(1, epochs * per_epoch)

    def build_autocast(self, mode: str) -> torch.dtype | None:
        if mode not in ("auto", "bf16", "fp16", "none"):
            raise UsageError(f"precision.autocast={mode!r}: use auto, bf16, fp16 or none")
        if mode == "none":
            return None
        if mode == "auto":
            # CPUs run bf16 matmuls slower than fp32, so autocast only where it pays.
            cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if cuda_bf16 else None
        return torch.bfloat16 if mode == "bf16" else torch.float16

    # ----------------------------------------------------------------------------- training
    def batches(self, loader) -> Iterator[dict]:
        """Endless batches, epoch after epoch; batches whose samples were all dropped are skipped."""
        epoch = 0
        while True:
            produced = False
            for batch in loader:
                if batch is None:
                    continue
                for name, why in batch.pop("dropped", []):
                    self.dropped_samples += 1
                    print0(f"dropped sample {name}: {why}")
                produced = True
                yield batch
            if not produced:
                raise UsageError(
                    "the training dataset yields no usable sample (see dropped samples above)"
                )
            epoch += 1

    def to_device(self, batch: dict) -> dict:
        dtype = next(self.model.parameters()).dtype
        return {
            k: (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device))
            for k, v in batch.items()
            if torch.is_tensor(v)
        }

    def forward_loss(self, batch: dict, num_label_tokens) -> torch.Tensor:
        """Loss for one micro-batch, divided by the step's label-token count."""
        labels = batch.pop("labels")
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, self.autocast_dtype, enabled=enabled):
            logits, targets = label_logits(self.model, batch, labels)
        return self.loss_fn(logits, targets, num_label_tokens)

    def train(self) -> Path:
        steps = self.cfg["step_scheduler"]
        log_every = steps["log_every_steps"]
        val_every = steps.get("val_every_steps")
        max_norm = self.cfg["clip_grad_norm"]["max_norm"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.dropped_samples = 0
        train_batches = self.batches(self.train_loader)
        if self.val_loader is not None:
            self.logger.log_validation(0, self.validate())

        self.set_train_mode()
        window = {"loss": torch.zeros((), device=self.device), "tokens": 0, "images": 0}
        window_start = time.perf_counter()
        for step in range(1, self.max_steps + 1):
            micro = [self.to_device(next(train_batches)) for _ in range(self.grad_accum)]
            num_label_tokens = sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in micro)
            for mb in micro:
                window["tokens"] += mb["attention_mask"].sum()
                window["images"] += mb.get("pixel_values", torch.empty(0)).shape[0]
                loss = self.forward_loss(mb, num_label_tokens)
                loss.backward()
                window["loss"] += loss.detach()
            if max_norm:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            if step % log_every == 0 or step == self.max_steps:
                # The only host syncs of the loop happen here, once per log step.
                seconds = time.perf_counter() - window_start
                steps_in_window = (step - 1) % log_every + 1
                self.logger.log_train(
                    step,
                    {
                        "loss": float(window["loss"]) / steps_in_window,
                        "lr": self.lr_scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": float(window["tokens"]) / seconds,
                        "images_per_s": float(window["images"]) / seconds,
                        "peak_memory_gb": peak_memory_gb(self.device),
                    },
                )
                window = {"loss": torch.zeros((), device=self.device), "tokens": 0, "images": 0}
                window_start = time.perf_counter()
            if self.val_loader is not None and val_every and step % val_every == 0:
                self.logger.log_validation(step, self.validate())
                self.set_train_mode()

        if self.val_loader is not None and not (val_every and self.max_steps % val_every == 0):
            self.logger.log_validation(self.max_steps, self.validate())
        if self.dropped_samples:
            print0(f"{self.dropped_samples} samples were dropped during training (reasons above)")
        final = save_hf_folder(self.model, self.processor, self.out_dir / "final_model")
        print0(f"saved {final}")
        self.preview()
        return final

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
        limit = self.cfg["step_scheduler"].get("val_batches")
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = 0
        for i, batch in enumerate(self.val_loader):
            if limit is not None and i >= limit:
                break
            if batch is None:
                continue
            batch.pop("dropped", None)
            batch = self.to_device(batch)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += self.forward_loss(batch, 1).double()
            tokens += n
        return {"val_loss": float(total) / max(1, tokens), "val_tokens": tokens}

    def preview(self) -> None:
        """Prints the model's reply for the first validation samples next to the reference."""
        cfg = self.cfg["preview"]
        dataset = getattr(self, "val_dataset", None)
        if not cfg["num_samples"] or dataset is None:
            return
        for i in range(min(cfg["num_samples"], len(dataset))):
            conversation = dataset[i]["conversation"]
            prediction = generate_reply(
                self.model, self.processor, prompt_messages(conversation), cfg["max_new_tokens"]
            )
            print0(f"validation sample {i}")
            print0(f"  reference:  {reply_text(conversation[-1])}")
            print0(f"  prediction: {prediction}")


def run(cfg: dict) -> Path:
    """Builds the recipe from a config, trains, and returns the ``final_model`` folder."""
    recipe = FinetuneRecipeForVLM(cfg)
    recipe.setup()
    return recipe.train()
