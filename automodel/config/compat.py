"""The tutorial's config layout, translated to the sections the recipe reads.

The tutorial writes one ``data`` section holding the dataset target and three loader settings:

    data:
      _target_: nemo_automodel.datasets.vlm.CORD_v2
      batch_size: 2          -> step_scheduler.local_batch_size (and global_batch_size)
      image_size: 448        -> the dataset builder's image_size
      max_seq_length: 512    -> dataloader.collate_fn.max_length

Everything else in ``data`` is passed to the dataset builder.
"""

from __future__ import annotations

import copy

from automodel.errors import UsageError

DEFAULT_COLLATE = "automodel.datasets.collate.default_collate_fn"


def translate_seed_layout(cfg: dict) -> dict:
    """Returns a copy of ``cfg`` with a ``data`` section split into the recipe's sections."""
    if "data" not in cfg:
        return cfg
    cfg = copy.deepcopy(cfg)
    data = cfg.pop("data")
    if not isinstance(data, dict):
        raise UsageError(f"data must be a section with a _target_, got {data!r}")
    if "dataset" in cfg:
        raise UsageError("the config has both 'data' and 'dataset': keep one of them")
    batch_size = data.pop("batch_size", None)
    max_seq_length = data.pop("max_seq_length", None)
    cfg["dataset"] = data
    if batch_size is not None:
        steps = cfg.setdefault("step_scheduler", {})
        steps.setdefault("local_batch_size", batch_size)
        steps.setdefault("global_batch_size", batch_size)
    if max_seq_length is not None:
        loader = cfg.setdefault("dataloader", {})
        collate = loader.setdefault("collate_fn", {"_target_": DEFAULT_COLLATE})
        collate.setdefault("max_length", max_seq_length)
    return cfg
