"""``automodel data cache-features``: a config's frozen-tower features computed ahead of the run.

The model, processor, collate, precision and device are built as ``finetune`` builds them, and
each image of the training and validation datasets goes through the model's own vision path
once, so the keys are the ones the run will look up (``models/vision_cache.py``). Images already
on disk are not computed again.
"""

from __future__ import annotations

import torch

from automodel.datasets.checks import screen_dataset
from automodel.distributed.env import destroy, init_distributed
from automodel.errors import UsageError
from automodel.models.forward import (
    apply_precision,
    autocast_dtype,
    image_features_sum,
    to_model,
    vision_inputs,
)
from automodel.models.vision_cache import build_vision_cache
from automodel.recipes.vlm.builders import (
    DATASET_SECTIONS,
    build,
    build_collate,
    build_dataloader,
    build_dataset,
    build_model,
    build_processor,
    run_prepare,
)
from automodel.recipes.vlm.config import FinetuneConfig


def cache_features(cfg: dict) -> int:
    """Fills ``vision_cache.path`` with the tower's output for every image of the config's
    ``dataset`` and ``validation_dataset``, printing a line per dataset and the totals.

    Args:
        cfg: the resolved config (``resolve_config``); ``vision_cache`` must say
            ``enabled: true`` and ``storage: disk``, as the run that reads the features does.

    Returns:
        The exit code, 0.

    Raises:
        UsageError: the config does not use a disk cache, or the model's tower cannot be cached.
    """
    sections = FinetuneConfig.from_config(cfg)
    settings = sections.vision_cache
    if not (settings.enabled and settings.storage == "disk"):
        raise UsageError(
            "data cache-features fills the cache a run reads from disk: set "
            "vision_cache.enabled=true and vision_cache.storage=disk in the config"
        )
    try:
        dist = init_distributed(sections.dist_env)  # one process: the device a run would use
        run_prepare(cfg)
        model = build_model(cfg, sections.freeze_config, dist.device)
        cache = build_vision_cache(model, settings)
        autocast = autocast_dtype(sections.precision.autocast, dist.device)
        apply_precision(model, sections.precision, autocast, dist.device)
        processor = build_processor(cfg)
        collate = build_collate(cfg, processor)
        rng = build(cfg, "rng")
        model.eval()
        for name in DATASET_SECTIONS:
            if not cfg.get(name):
                continue
            dataset = screen_dataset(build_dataset(cfg, name), name, None, sections.data_check)
            loader = build_dataloader(
                cfg,
                dataset,
                collate,
                train=name == "dataset",  # the training loader's workers; the order is moot
                batch_size=sections.step_scheduler.local_batch_size,
                rank=0,
                world_size=1,
                rng=rng,
                processor=processor,
            )
            hits, computed = cache.hits, cache.computed
            for batch in loader:
                inputs = vision_inputs(to_model(batch, model)) if batch is not None else {}
                if not inputs:
                    continue
                with (
                    torch.no_grad(),
                    torch.autocast(dist.device.type, autocast, enabled=autocast is not None),
                ):
                    image_features_sum(model, inputs)
            hits, computed = cache.hits - hits, cache.computed - computed
            print(f"{name}: {hits + computed} images, {computed} computed, {hits} already cached")
        print(cache.report())
        return 0
    finally:
        destroy()
