"""What each data-parallel rank feeds the model, so that every rank takes part in every step.

Under data parallelism every forward and backward has collectives that need all ranks. A rank
whose batch lost all its samples (dropped by the collate), whose validation share ran out
first, or whose micro-batch has no image must still run a forward of the same shape of work:
``BatchFeed`` gives it a batch without labels (``idle_batch``), the tower's blank-image inputs
(``blank_image_inputs``, see ``models.forward.TrainForward``), and before the first step
freezes the parameters no step can reach (``freeze_unreached``), which would otherwise leave
ranks reducing different gradients. In one process it only skips empty batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from automodel.common import IGNORE_INDEX, print0
from automodel.datasets.collate import has_rows
from automodel.distributed import parallelize
from automodel.distributed.env import any_rank
from automodel.errors import UsageError
from automodel.models.forward import blank_image_sample, to_model, vision_inputs
from automodel.training.signals import workers_starting


class BatchFeed:
    """The training and validation batches of one rank, and what it runs when it has none.

    Args:
        collate: the run's collate function (processor bound).
        world_size: the number of data-parallel ranks.

    Attributes:
        epoch: the training epoch being read (saved with every checkpoint).
        dropped_samples: training samples the collate dropped so far (saved too).
        images: images fed since the last ``take_images()``.
    """

    def __init__(self, collate: Callable[[list], dict | None], world_size: int):
        self.collate = collate
        self.world_size = world_size
        self.epoch = 0
        self.dropped_samples = 0
        self.images = 0
        self._blank: tuple[dict, torch.Tensor] | None = None

    def batches(self, loader, resumed: bool, write: Callable[[str], None]) -> Iterator[dict]:
        """Endless training batches, epoch after epoch.

        Batches whose samples were all dropped are skipped, or under data parallelism replaced
        by an ``idle_batch``. Each dropped sample is counted and reported through ``write``.

        Args:
            loader: the training loader (its sampler gets ``set_epoch``).
            resumed: the loader was restored from a checkpoint; one restored at the end of an
                epoch yields nothing once, then the next epoch.
            write: prints a line (the run's logger).

        Raises:
            UsageError: a whole epoch yields no usable batch.
        """
        while True:
            produced = False
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(self.epoch)
            with workers_starting():
                epoch = iter(loader)
            for batch in epoch:
                for name, why in batch.pop("dropped", []) if batch is not None else []:
                    self.dropped_samples += 1
                    write(f"dropped sample {name}: {why}")
                if not has_rows(batch):
                    if self.world_size == 1:
                        continue
                    batch = self.idle_batch()
                    batch.pop("dropped", None)
                self.images += batch.pop("num_images", 0)
                produced = True
                yield batch
            if not produced and not resumed:
                raise UsageError(
                    "the training dataset yields no usable sample (see dropped samples above)"
                )
            resumed = False
            self.epoch += 1

    def validation_batches(self, loader, limit: int | None = None) -> Iterator[dict]:
        """The loader's batches (the first ``limit``), then, while another rank still has
        some, idle batches: every forward's collectives have partners."""
        with workers_starting():
            batches = iter(loader)
        end = object()
        for i in itertools.count():
            batch = next(batches, end) if limit is None or i < limit else end
            if not any_rank(batch is not end):
                return
            if batch is end or not has_rows(batch):
                if self.world_size == 1:
                    continue
                batch = self.idle_batch()
            yield batch

    def take_images(self) -> int:
        """The images fed since the last call."""
        images, self.images = self.images, 0
        return images

    def idle_batch(self) -> dict:
        """One blank-image sample with no label: a micro-batch that changes nothing."""
        batch = self.collate([blank_image_sample()])
        batch["labels"].fill_(IGNORE_INDEX)
        batch["num_images"] = 0
        return batch

    def blank_image_inputs(self, model: nn.Module) -> dict | None:
        """The tower's inputs for one blank image on ``model``'s device, which a micro-batch
        without images runs under data parallelism (``TrainForward``); None in one process."""
        inputs = vision_inputs(self._blank_sample(model)[0])
        return inputs if self.world_size > 1 else None

    def freeze_unreached(self, module: nn.Module, model: nn.Module) -> None:
        """Freezes the trainable parameters one step of ``module`` on a blank sample leaves
        without gradient (e.g. LLaVA's unused last tower layer), so every rank reduces the same
        gradients (see ``distributed.parallelize.freeze_unreached``)."""
        batch, labels = self._blank_sample(model)
        unreached = parallelize.freeze_unreached(module, batch, labels)
        if unreached:
            print0(
                f"frozen: {len(unreached)} parameters the loss never reaches (each rank must "
                f"reduce the same gradients), e.g. {unreached[0].removeprefix('model.')}"
            )

    def _blank_sample(self, model: nn.Module) -> tuple[dict, torch.Tensor]:
        """One collated blank-image sample (a reply labelled) on the model: inputs, labels."""
        if self._blank is None:
            collated = self.collate([blank_image_sample()])
            if not has_rows(collated):
                # The one-word sample does not fit: no real sample with an image would either.
                raise UsageError(
                    "a one-word sample with one small image does not fit "
                    "dataloader.collate_fn.max_length (the chat template's own prompt may be "
                    "long: Mistral 3's system prompt is about 370 tokens); raise max_length"
                )
            batch = to_model(collated, model)
            self._blank = batch, batch.pop("labels")
        return self._blank
