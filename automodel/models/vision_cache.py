"""An exact cache of a frozen vision tower's outputs, so later epochs skip the tower.

The tower's ``forward`` is wrapped on the instance (its parameters and state-dict keys are
untouched). Each image row of ``pixel_values`` is keyed by a hash of its exact bytes; a row seen
before gets its stored output back, the others go through the tower. The output is the tower's,
bit for bit, as long as the tower cannot change: its parameters are frozen, it runs in eval
mode (no dropout), and the pixels themselves are the key (a random augmentation makes new keys,
it does not reuse stale outputs). A tower in training mode is run without the cache.

Only towers that embed each image on its own from a ``[N, C, H, W]`` batch and whose callers read
``last_hidden_state`` are cached (SigLIP in Gemma 3 and PaliGemma, CLIP/SigLIP in LLaVA: the
family registry's ``cached_tower``); others are refused when the cache is switched on.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from automodel.config.sections import VisionCacheConfig
from automodel.errors import UsageError
from automodel.models.families import family_of, transformers_model


def _row_key(pixels: torch.Tensor, extra: tuple) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((pixels.dtype, tuple(pixels.shape), extra)).encode())
    digest.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.digest()


class VisionCache:
    """Outputs of one frozen vision tower, keyed by image bytes.

    Args:
        tower: the vision tower module (the family registry's ``cached_tower``).
        max_images: stop adding entries after this many (``None``: no limit).
        device: where entries are stored (``"cpu"`` saves accelerator memory).
    """

    def __init__(
        self, tower: torch.nn.Module, max_images: int | None = None, device: str | None = "cpu"
    ) -> None:
        self.tower = tower
        self.max_images = max_images
        self.device = device
        self.entries: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.original_forward = tower.forward
        tower.forward = self.forward

    def forward(self, pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise UsageError(
                "vision_cache.enabled: this model reads the vision tower's intermediate layers, "
                "which the cache does not keep; set vision_cache.enabled=false"
            )
        if self.tower.training or args or pixel_values is None or pixel_values.dim() != 4:
            return self.original_forward(pixel_values, *args, **kwargs)
        extra = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if not torch.is_tensor(v)))
        if any(torch.is_tensor(v) for v in kwargs.values()):
            return self.original_forward(pixel_values, **kwargs)
        keys = [_row_key(row, extra) for row in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        fresh = {}
        if missing:
            out = self.original_forward(pixel_values[missing], **kwargs).last_hidden_state
            for j, i in enumerate(missing):
                fresh[keys[i]] = out[j]
                if self.max_images is None or len(self.entries) < self.max_images:
                    self.entries[keys[i]] = out[j].detach().to(self.device or out.device)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        device = pixel_values.device
        rows = [fresh[k] if k in fresh else self.entries[k].to(device) for k in keys]
        return BaseModelOutput(last_hidden_state=torch.stack(rows))

    def close(self) -> None:
        """Restores the tower's own forward and drops the entries."""
        self.tower.forward = self.original_forward
        self.entries.clear()


def build_vision_cache(model, config: VisionCacheConfig) -> VisionCache | None:
    """Wraps the model's frozen vision tower with a ``VisionCache`` when ``config.enabled``.

    Args:
        model: the VLM (or its PEFT wrapper), after freezing.
        config: the ``vision_cache`` section (``enabled``, ``max_images``, ``device``).

    Returns:
        The cache, or ``None`` when disabled.

    Raises:
        UsageError: the tower trains (some of its parameters require grad) or was not found.
    """
    if not config.enabled:
        return None
    inner = transformers_model(model)
    path = family_of(inner).cached_tower
    if path is None:
        raise UsageError(
            "vision_cache.enabled: found no single vision tower in this model; "
            "set vision_cache.enabled=false"
        )
    tower = inner.get_submodule(path)
    if any(p.requires_grad for p in tower.parameters()):
        raise UsageError(
            "vision_cache.enabled needs a frozen vision tower: set "
            "freeze_config.freeze_vision_tower=true (and keep LoRA off the tower), or turn the "
            "cache off"
        )
    return VisionCache(tower, config.max_images, config.device)
