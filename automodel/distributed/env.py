"""The process group: who we are, which device we use, and the few collectives the loop needs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from automodel.config.sections import DistEnvConfig


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(config: DistEnvConfig | None = None) -> DistInfo:
    """Joins the process group torchrun describes in the environment; one process otherwise.

    Args:
        config: the ``dist_env`` section (None: its defaults): ``backend`` (``nccl`` or ``gloo``; default nccl when
            CUDA is available, gloo otherwise) and ``timeout_minutes`` (how long a collective
            may wait before the job fails).
    """
    config = config or DistEnvConfig()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = config.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(minutes=config.timeout_minutes),
            device_id=(device if device.type == "cuda" else None),
        )
    return DistInfo(rank, world_size, local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_ranks_error(error: str | None) -> str | None:
    """The first rank's error message when any rank has one (every rank must call this)."""
    if not is_distributed():
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def from_rank0(compute):
    """``compute()`` run on rank 0 alone, its result on every rank (every rank must call this;
    ``compute`` must return, not raise, or the other ranks wait forever)."""
    if not is_distributed():
        return compute()
    value = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def _flag_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (every rank must call this)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=_flag_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def first_on_any_rank(value):
    """The lowest rank's ``value`` that is not None, on every rank (None when all are None).

    A stop request (SIGTERM, too many bad steps) seen by one rank stops all at the same step.
    """
    if not is_distributed() or not any_rank(value is not None):
        return value
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return next(v for v in values if v is not None)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a ``DTensor`` (e.g. the grad norm of sharded parameters)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all ranks in place (a no-op on one process) and returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def loss_divisor(local_label_tokens: torch.Tensor, world_size: int) -> torch.Tensor:
    """What each rank divides its summed loss by, so averaged gradients equal one big batch's.

    DDP and FSDP2 average gradients over ranks; dividing by ``global_tokens / world_size``
    instead of ``global_tokens`` undoes that average exactly.
    """
    total = all_reduce_sum(local_label_tokens.detach().clone().float())
    return total / world_size


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
