"""Applying data parallelism to a transformers VLM, outside the model code.

``parallelize`` does, in order: activation checkpointing, then FSDP2's ``fully_shard`` on each
transformer block (decoder and vision encoder layers), on the vision tower, and on the root — or
wraps the root in DDP. The model file stays free of distributed code.
"""

from __future__ import annotations

import contextlib
from typing import get_args

import torch
from torch import nn

from automodel.config.sections import Strategy
from automodel.errors import UsageError
from automodel.models.families import family_of, transformers_model

STRATEGIES = get_args(Strategy)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: members of a ``ModuleList`` whose class is
    one the model declares unsplittable (``_no_split_modules``), e.g. ``Gemma3DecoderLayer`` and
    ``SiglipEncoderLayer``. ``model`` may wrap the transformers model (PEFT, ``TrainForward``)."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks += [m for m in module if type(m).__name__ in names]
    return blocks


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision tower inside ``model`` (which may wrap the transformers model), as the family
    registry names it, or None."""
    inner = transformers_model(model)
    paths = family_of(inner).tower
    return inner.get_submodule(paths[0]) if paths else None


DTYPE_KEYS = ("param_dtype", "reduce_dtype")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 root (its parameters are shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


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
        _enable_recomputation(module)
    if strategy == "none":
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = mesh.device_type
        ids = [torch.cuda.current_device()] if device == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, process_group=mesh.get_group())

    return _fully_shard(module, mesh, param_dtype, reduce_dtype, cpu_offload)


def _enable_recomputation(module: nn.Module) -> None:
    """transformers' non-reentrant gradient checkpointing on the first model found inside."""
    for candidate in module.modules():
        if hasattr(candidate, "activation_checkpointing_enable"):
            candidate.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            # transformers then makes the output of every input embedding require grad, the
            # vision tower's patch embedding included: reentrant checkpointing needs that to
            # reach adapters behind frozen inputs, the non-reentrant kind used here does not. A
            # frozen tower (kept in eval mode, so never recomputed) would record its whole
            # forward for a backward that updates nothing: with Gemma 3's tower at 896 px and
            # eager attention, about 2 GB of saved activations per layer.
            candidate.disable_input_require_grads()
            return


def _fully_shard(
    module: nn.Module,
    mesh,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    cpu_offload: bool,
) -> nn.Module:
    """FSDP2: each decoder block, the vision tower and the root, each a unit of its own."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # Each rank keeps its slice of the tensors it holds: weights drawn at random on each rank
    # (LoRA's A, with rank-dependent seeds) would otherwise mix. DDP broadcasts by itself.
    _broadcast_from_rank0(module, mesh)
    kwargs = {"mesh": mesh}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype
        )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # The tower (its blocks too) stays gathered from forward to backward: a rank that ran it on a
    # blank image (no image in its batch) reaches the tower's gradients at another moment than a
    # rank with images, and a backward all-gather would pair with another collective there.
    tower = vision_tower(module)
    in_tower = {id(m) for m in tower.modules()} if tower is not None else set()
    with _output_recording_kept(module):
        for block in transformer_blocks(module):
            fully_shard(block, reshard_after_forward=id(block) not in in_tower, **kwargs)
        if tower is not None:
            fully_shard(tower, reshard_after_forward=False, **kwargs)
        fully_shard(module, **kwargs)
    return module


def freeze_unreached(module: nn.Module, batch: dict, labels: torch.Tensor) -> list[str]:
    """Freezes the trainable parameters that one training step on ``batch`` gives no gradient.

    DDP stops when a trainable parameter gets no gradient (e.g. LLaVA reads the tower's
    second-to-last layer: its last layer and ``post_layernorm`` never train). Such parameters
    cannot change in any run, so freezing them changes nothing but lets DDP run.

    Args:
        module: the ``TrainForward`` root (called as ``module(batch, labels, divisor)``).
        batch, labels: one collated sample with an image and a labelled reply.

    Returns:
        The names frozen.
    """
    module(batch, labels, 1).backward()
    unreached = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in module.named_parameters():
        param.grad = None
        if name in unreached:
            param.requires_grad_(False)
    return unreached


@contextlib.contextmanager
def _output_recording_kept(module: nn.Module):
    """Keeps transformers' hidden-state recording working on modules ``fully_shard`` re-classes.

    transformers keys each model's recordable outputs on its class name; ``fully_shard`` swaps
    the class (``CLIPVisionModel`` -> ``FSDPCLIPVisionModel``), after which e.g. LLaVA's tower
    returns no ``hidden_states`` and its image features fail.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers layout: nothing to keep
        yield
        return
    before = {id(m): (m, _CAN_RECORD_REGISTRY.get(m)) for m in module.modules()}
    yield
    for m, recordable in before.values():
        if recordable and not _CAN_RECORD_REGISTRY.get(m):
            _CAN_RECORD_REGISTRY[m] = recordable


@torch.no_grad()
def _broadcast_from_rank0(module: nn.Module, mesh) -> None:
    import torch.distributed as dist

    group = mesh.get_group()
    source = dist.get_global_rank(group, 0)
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=source, group=group)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Skips the gradient reduction of a micro-batch that is not the step's last (DDP, FSDP2)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def reshard(module: nn.Module) -> None:
    """Returns every FSDP2 unit of ``module`` to its shards after a forward with no backward
    (validation, generation): the root and the tower keep their gathered parameters after a
    forward, for the backward they expect, and until they reshard the model holds those rather
    than the sharded parameters the optimizer steps (its state would not map to the model's
    names, and a checkpoint could not be taken)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Parameters of an FSDP2 root kept whole while the inner model is called directly (e.g.
    ``generate``); blocks and the tower still gather their own. Every rank must enter it and make
    the same calls inside."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        reshard(module)
