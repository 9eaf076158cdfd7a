"""An exact cache of a frozen vision tower's outputs, so later epochs, runs and resumes skip it.

The tower's ``forward`` is wrapped on the instance (its parameters and state-dict keys are
untouched). Each image row of ``pixel_values`` gets a key; a row whose key is stored gets its
stored output back, the others go through the tower. The output is the tower's, bit for bit,
because the key holds everything that changes it:

- the row's exact bytes, dtype and shape, and the call's other arguments (the pixels already
  reflect the processor's resizing and normalisation; a random augmentation makes new keys);
- the autocast dtype and device the tower runs in (bf16 autocast changes an fp32 output's
  values, not its dtype), the torch version, the CPU's instruction set or the GPU's name, and
  TF32 and fp32-attention switches;
- on disk, where runs share entries, the tower itself: a SHA-256 of its class, its config and
  attention implementation (``sdpa`` and ``eager`` differ in the last bits) and every tensor of
  its state dict. Changed weights make new keys, never stale reuse. The hash is computed at the
  first cached call, after a resumed run has loaded its weights (0.7 GB/s on a busy 2-core CPU).

The tower must not change during the run: its parameters are frozen and it runs in eval mode
(no dropout); a tower in training mode is run without the cache.

``storage: disk`` keeps one safetensors file per image, ``PATH/<tower hash>/<key[:2]>/<key>``,
read through ``safetensors``' memory map. A file is written under a temporary name and renamed,
so ranks writing the same entry at once, or a run killed mid-write, never leave a torn one.

Only towers that embed each image on its own from a ``[N, C, H, W]`` batch and whose callers read
``last_hidden_state`` are cached (SigLIP in Gemma 3 and PaliGemma, CLIP/SigLIP in LLaVA: the
family registry's ``cached_tower``); others are refused when the cache is switched on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from transformers.modeling_outputs import BaseModelOutput

from automodel.common import print0
from automodel.config.sections import VisionCacheConfig
from automodel.errors import UsageError
from automodel.models.attention import runs_fp32_attention
from automodel.models.families import family_of, transformers_model


def _tensor_bytes(tensor: torch.Tensor):
    """A tensor's bytes as a buffer hashlib reads without another copy (on the CPU)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """A hash of what fixes the tower's function: its class, config (attention implementation
    included) and every state-dict tensor's name, dtype, shape and bytes.

    Args:
        tower: the vision tower module.

    Returns:
        32 hex digits.
    """
    digest = hashlib.sha256(type(tower).__qualname__.encode())
    config = getattr(tower, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
        settings["attn_implementation"] = getattr(config, "_attn_implementation", None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in tower.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()[:32]


def machine_settings(device: torch.device, tower: torch.nn.Module) -> str:
    """What, besides the tower and its input, decides the output's last bits on ``device``."""
    parts = [torch.__version__, device.type, f"fp32 attention {runs_fp32_attention(tower)}"]
    if device.type == "cuda":
        parts += [
            torch.cuda.get_device_name(device),
            str(torch.version.cuda),
            str(torch.backends.cudnn.version()),
            f"tf32 {torch.backends.cuda.matmul.allow_tf32} {torch.backends.cudnn.allow_tf32}",
            torch.get_float32_matmul_precision(),
        ]
    elif device.type == "cpu":
        parts += [platform.machine(), torch.backends.cpu.get_cpu_capability()]
    return " | ".join(parts)


def _autocast(device_type: str) -> str:
    if not torch.is_autocast_enabled(device_type):
        return "no autocast"
    return f"autocast {torch.get_autocast_dtype(device_type)}"


def _row_key(prefix: bytes, pixels: torch.Tensor) -> str:
    digest = hashlib.sha256(prefix)
    digest.update(f"{pixels.dtype} {tuple(pixels.shape)}".encode())
    digest.update(_tensor_bytes(pixels))
    return digest.hexdigest()[:32]


class MemoryStore:
    """Entries in a dict, for the run's later epochs.

    Args:
        device: where entries live (``None``: where the tower computed them).
    """

    shared = False

    def __init__(self, device: str | None = "cpu") -> None:
        self.device = device
        self.entries: dict[str, torch.Tensor] = {}

    def where(self) -> str:
        return "in memory"

    def get(self, key: str, device: torch.device) -> torch.Tensor | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.to(device)

    def put(self, key: str, features: torch.Tensor) -> int:
        """Stores ``features``; returns the bytes they take."""
        entry = features.detach().to(self.device or features.device)
        self.entries[key] = entry
        return entry.numel() * entry.element_size()

    def clear(self) -> None:
        self.entries.clear()


class DiskStore:
    """One safetensors file per entry under ``root/<tower hash>/``, shared by runs.

    Args:
        root: the cache folder (``vision_cache.path``); created here.

    Raises:
        UsageError: the folder cannot be created.
    """

    shared = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.folder = self.root  # the tower's subfolder once ``open`` has named it
        self.failed = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"vision_cache.path: cannot create {self.root} ({error.strerror or error}); "
                "choose a writable folder"
            ) from None

    def open(self, tower_hash: str, about: dict) -> None:
        """Uses the subfolder of the tower whose hash is ``tower_hash``; ``about`` is written
        beside the entries as ``tower.json`` (which model and tower they came from)."""
        self.folder = self.root / tower_hash
        if not (self.folder / "tower.json").exists():
            self._write(self.folder / "tower.json", (json.dumps(about, indent=2) + "\n").encode())

    def where(self) -> str:
        return f"at {self.folder}"

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str, device: torch.device) -> torch.Tensor | None:
        try:
            # load_file memory-maps the file; the tensor is read from the map to ``device``.
            return load_file(self.path(key), device=str(device))["features"]
        except (OSError, SafetensorError, KeyError):
            return None  # absent; or unreadable, then computed again and rewritten

    def put(self, key: str, features: torch.Tensor) -> int:
        """Writes ``features`` (tmp name, then an atomic rename); returns the bytes written, 0
        when the folder cannot be written (said once; the run goes on without storing)."""
        if self.failed:
            return 0
        data = safetensors_bytes({"features": features.detach().contiguous().cpu()})
        try:
            self._write(self.path(key), data)
        except OSError as error:
            self.failed = True
            print0(
                f"vision cache: cannot write to {self.folder} ({error.strerror or error}); "
                "image features are computed from here on without being stored"
            )
            return 0
        return len(data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        pass


class VisionCache:
    """Outputs of one frozen vision tower, keyed by image bytes (see the module docstring).

    Args:
        tower: the vision tower module (the family registry's ``cached_tower``).
        store: a ``MemoryStore`` or a ``DiskStore``.
        max_images: stop adding entries after this many (``None``: no limit).

    Attributes:
        hits: images whose output came from the store.
        computed: images that went through the tower.
        stored, stored_bytes: entries this cache added, and their size.
    """

    def __init__(
        self, tower: torch.nn.Module, store: MemoryStore | DiskStore, max_images: int | None = None
    ) -> None:
        self.tower = tower
        self.store = store
        self.max_images = max_images
        self.hits = self.computed = self.stored = self.stored_bytes = 0
        self.tower_hash: str | None = None
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
        if any(torch.is_tensor(v) for v in kwargs.values()):
            return self.original_forward(pixel_values, **kwargs)
        device = pixel_values.device
        prefix = self.key_prefix(device, kwargs)
        keys = [_row_key(prefix, row) for row in pixel_values.detach().cpu()]  # one copy
        rows = [self.store.get(key, device) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            out = self.original_forward(pixel_values[missing], **kwargs).last_hidden_state
            for j, i in enumerate(missing):
                rows[i] = out[j]
                if self.max_images is None or self.stored < self.max_images:
                    size = self.store.put(keys[i], out[j])
                    if size:
                        self.stored += 1
                        self.stored_bytes += size
        self.computed += len(missing)
        self.hits += len(keys) - len(missing)
        return BaseModelOutput(last_hidden_state=torch.stack(rows))

    def key_prefix(self, device: torch.device, kwargs: dict) -> bytes:
        """The part of every row's key that is not the row: the tower (on disk), the machine,
        the autocast dtype and the call's arguments."""
        if self.tower_hash is None:
            self.tower_hash = tower_fingerprint(self.tower) if self.store.shared else ""
            if isinstance(self.store, DiskStore):
                self.store.open(self.tower_hash, self.describe())
        extra = sorted((k, repr(v)) for k, v in kwargs.items())
        settings = (self.tower_hash, machine_settings(device, self.tower), _autocast(device.type))
        return repr((settings, extra)).encode()

    def describe(self) -> dict:
        """What ``tower.json`` says about the entries' origin."""
        config = getattr(self.tower, "config", None)
        return {
            "tower": type(self.tower).__name__,
            "model_type": getattr(config, "model_type", None),
            "parameters": sum(p.numel() for p in self.tower.parameters()),
            "dtype": str(next(self.tower.parameters()).dtype),
        }

    def counts(self) -> list[int]:
        """``[hits, computed, stored, stored_bytes]`` (summed over ranks by the recipe)."""
        return [self.hits, self.computed, self.stored, self.stored_bytes]

    def report(self, counts: list[int] | None = None) -> str:
        """One line: ``vision cache: 120 hits, 40 computed, 40 stored (12.3 MB at PATH)``."""
        hits, computed, stored, size = counts or self.counts()
        return (
            f"vision cache: {hits} hits, {computed} computed, {stored} stored "
            f"({size / 1e6:.1f} MB {self.store.where()})"
        )

    def close(self) -> None:
        """Restores the tower's own forward and drops in-memory entries."""
        self.tower.forward = self.original_forward
        self.store.clear()


def build_vision_cache(model, config: VisionCacheConfig) -> VisionCache | None:
    """Wraps the model's frozen vision tower with a ``VisionCache`` when ``config.enabled``.

    Args:
        model: the VLM (or its PEFT wrapper), after freezing.
        config: the ``vision_cache`` section (``enabled``, ``storage``, ``path``,
            ``max_images``, ``device``).

    Returns:
        The cache, or ``None`` when disabled.

    Raises:
        UsageError: the tower trains (some of its parameters require grad) or was not found, or
            the cache folder cannot be created.
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
    if config.storage == "disk":
        store: MemoryStore | DiskStore = DiskStore(config.path)
    else:
        store = MemoryStore(config.device)
    return VisionCache(tower, store, config.max_images)
