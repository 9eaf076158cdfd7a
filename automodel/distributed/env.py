"""The process group: who we are, which device we use, and the few collectives the loop needs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_distributed(backend: str | None = None, timeout_minutes: int = 10) -> DistInfo:
    """Joins the process group torchrun describes in the environment; one process otherwise.

    Args:
        backend: ``nccl`` or ``gloo``; default nccl when CUDA is available, gloo otherwise.
        timeout_minutes: how long a collective may wait before the job fails.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=(device if device.type == "cuda" else None),
        )
    return DistInfo(rank, world_size, local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
