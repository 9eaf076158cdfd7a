"""Applying data parallelism to a transformers VLM, outside the model code.

``parallelize`` does, in order: activation checkpointing, then FSDP2's ``fully_shard`` on each
transformer block (decoder and vision encoder layers), on the vision tower, and on the root — or
wraps the root in DDP. The model file stays free of distributed code.
"""

from __future__ import annotations

import torch
from torch import nn

from automodel.errors import UsageError

STRATEGIES = ("none", "ddp", "fsdp2")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: members of a ``ModuleList`` whose class is
    one the model declares unsplittable (``_no_split_modules``), e.g. ``Gemma3DecoderLayer`` and
    ``SiglipEncoderLayer``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks += [m for m in module if type(m).__name__ in names]
    return blocks


def vision_tower(model: nn.Module) -> nn.Module | None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(inner, "model", inner)
    for name in ("vision_tower", "vision_model", "visual"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def build_mesh(device_type: str, world_size: int, dp_size: int | None = None):
    """A one-dimensional data-parallel ``DeviceMesh`` over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    dp = dp_size or world_size
    if dp != world_size:
        raise UsageError(
            f"distributed.dp_size={dp_size} must equal the number of processes ({world_size}); "
            "tensor and context parallelism are not available"
        )
    return init_device_mesh(device_type, (dp,), mesh_dim_names=("dp",))


def parallelize(
    module: nn.Module,
    mesh,
    strategy: str = "fsdp2",
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Makes ``module`` data parallel over ``mesh``.

    Gradients are averaged over ranks, as DDP and FSDP2 do by default (gloo has no pre-scaled
    sum). The loop therefore divides each rank's summed loss by the global label-token count
    divided by the number of ranks (``automodel.distributed.env.loss_divisor``), so N processes
    make the same update as one process with the same global batch.

    Args:
        module: the root to train (its forward is what the loop calls); blocks are found inside.
        mesh: the data-parallel ``DeviceMesh`` (None for ``strategy="none"``).
        strategy: ``none``, ``ddp`` or ``fsdp2``.
        activation_checkpointing: recompute block activations in backward (transformers'
            non-reentrant gradient checkpointing, which keeps parameter names unchanged).
        param_dtype / reduce_dtype: FSDP2 mixed precision: the dtype blocks compute in and the
            dtype gradients are reduced in (e.g. bfloat16 / float32).
        cpu_offload: FSDP2 keeps sharded parameters and gradients in CPU memory.

    Returns:
        The module to call in the training loop.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"distributed.strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
    if activation_checkpointing:
        for candidate in module.modules():
            if hasattr(candidate, "gradient_checkpointing_enable"):
                candidate.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
                break
    if strategy == "none":
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = mesh.device_type
        ids = [torch.cuda.current_device()] if device == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, process_group=mesh.get_group())

    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype
        )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in transformer_blocks(module):
        fully_shard(block, **kwargs)
    tower = vision_tower(module)
    if tower is not None:
        fully_shard(tower, **kwargs)
    fully_shard(module, **kwargs)
    return module
