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
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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
    if preference not in ("auto", "cuda", "cpu"):
        raise ValueError(f"train.device must be auto, cuda or cpu, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
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
        join_process_group(rank, world_size, device)
    return DistributedContext(rank, world_size, local_rank, device)


def join_process_group(rank: int, world_size: int, device: torch.device) -> None:
    """NCCL for GPU processes, bound to this process's GPU (its communicator is made now, so a
    broken NCCL setup fails here, not at the first collective); gloo for CPU ones."""
    if device.type == "cuda":
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)


def data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over the process group, one device per process.

    DDP broadcasts rank 0's buffers before every forward unless told not to: a collective per
    step. Frozen BN statistics and the input normalization's constants never change, so only a
    model with trainable BatchNorm layers (whose running statistics each rank updates) pays it.
    """
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    changing_buffers = any(isinstance(m, batch_norms) and m.track_running_stats for m in model.modules())
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=changing_buffers)


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
