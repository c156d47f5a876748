"""Process group setup from torchrun's environment, read once at entry.

`torchrun --nproc_per_node=N` (and multi-node rendezvous) sets RANK, WORLD_SIZE and
LOCAL_RANK; a plain `python train/main.py` has none of them and runs as rank 0 of 1.
NCCL joins GPU processes, gloo CPU ones. Only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from train.config import ConfigError
from train.config_schema import DEVICES


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """The one process that writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int) -> torch.device:
    """auto -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if preference not in DEVICES:
        raise ConfigError(f"train.device must be one of {', '.join(DEVICES)}, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but this machine has no CUDA device; use train.device=auto or cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto", env: Mapping[str, str] | None = None) -> DistributedContext:
    """Join the process group torchrun describes (none for a single process)."""
    env = os.environ if env is None else env
    rank = int(env.get("RANK", 0))
    world_size = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(ctx: DistributedContext, value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the evaluation result that decides whether to stop)."""
    if not ctx.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_ranks_sum(ctx: DistributedContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (logging only; the gradients are DDP's business)."""
    if ctx.is_distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor
