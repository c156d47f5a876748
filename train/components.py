"""Build a run's parts from the frozen config: torch settings, loaders, the model.

Shared by `train/main.py` and the dry runs (`train/dry_run.py`), so both train exactly
the same thing. Every function takes what it needs as arguments; nothing reads env vars.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model import build_model
from model.weights import load_weights
from pipeline.loader import build_loader
from pipeline.shard_format import read_manifest
from pipeline.batch import bucket_shapes
from train.checkpoint import CheckpointError
from train.config import Config, ConfigError
from train.distributed import DistributedContext

log = logging.getLogger(__name__)

WEIGHTS_WANTED = "a trainer checkpoint, a torchvision ResNet-50 or Mask R-CNN state dict, or Detectron's R-50.pkl"


def configure_torch(train_cfg: Config, seed: int, rank: int) -> None:
    """Threads, denormals, determinism and seeds (each rank its own stream, reproducible per rank)."""
    # On the CPU, near-zero gradients (the reference's N(0, 0.001) box-delta init makes many)
    # are denormal floats, which cost the FPU ~100x: flushing them halves a CPU training step.
    # Set before the first parallel op: OpenMP's threads copy the flag from this thread when
    # they start, and never again.
    torch.set_flush_denormal(True)
    if train_cfg.num_threads > 0:
        torch.set_num_threads(train_cfg.num_threads)
    torch.use_deterministic_algorithms(train_cfg.deterministic)
    # static bucket shapes make cudnn's autotuning pay off; it is not deterministic
    torch.backends.cudnn.benchmark = not train_cfg.deterministic
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def per_rank_batch(global_batch: int, world_size: int, key: str) -> int:
    if global_batch % world_size:
        raise ConfigError(f"{key}={global_batch} is not divisible by the {world_size} processes; pick a multiple")
    return global_batch // world_size


def require_shards(path: str, key: str) -> Path:
    """A shard folder named by `key` must exist and hold a manifest."""
    if not path:
        raise ConfigError(f"{key} is empty; pass a shard folder written by tools/shard_coco.py")
    folder = Path(path)
    if not (folder / "manifest.json").is_file():
        raise ConfigError(f"{key}={path} is not a shard folder (no manifest.json); write one with tools/shard_coco.py")
    return folder


def require_file(path: str, key: str, what: str) -> Path:
    if not path or not Path(path).is_file():
        raise ConfigError(f"{key}={path!r} is not a file; pass {what}")
    return Path(path)


def require_inputs(cfg: Config) -> None:
    """Every input a training run reads exists (one clear sentence for the first that does not).

    The val shards and annotations are needed only when the run evaluates (eval.every_epochs > 0).
    """
    require_shards(cfg.data.train_shards, "data.train_shards (--data)")
    if cfg.eval.every_epochs:
        require_shards(cfg.data.val_shards, "data.val_shards (--val-data)")
        require_file(cfg.data.val_annotations, "data.val_annotations (--val-annotations)", "the instances JSON of the val shards")
    if cfg.train.weights:
        require_file(cfg.train.weights, "train.weights", WEIGHTS_WANTED)


def build_data_loader(cfg: Config, ctx: DistributedContext, *, training: bool) -> Any:
    """This rank's loader: the train shards (shuffled, flipped) or the val shards (each image once)."""
    if training:
        shards = require_shards(cfg.data.train_shards, "data.train_shards (--data)")
        batch = per_rank_batch(cfg.solver.ims_per_batch, ctx.world_size, "solver.ims_per_batch")
    else:
        shards = require_shards(cfg.data.val_shards, "data.val_shards (--val-data)")
        batch = per_rank_batch(cfg.eval.ims_per_batch, ctx.world_size, "eval.ims_per_batch")
    return build_loader(
        cfg.data, shards, training=training, batch_size=batch,
        rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed, device=str(ctx.device),
    )


def categories_of(shard_dir: str | Path) -> list[dict[str, Any]]:
    """The shards' categories as their manifest lists them (contiguous id, COCO id, name)."""
    return read_manifest(Path(shard_dir))["categories"]


def build_training_model(cfg: Config, device: torch.device, categories: list[dict[str, Any]]) -> torch.nn.Module:
    """The model for `categories` (plus background) with its initial weights, on `device`, in channels_last.

    `train.weights` may be any file model/weights.py reads; fine-tuning onto other categories
    starts the class-specific layers fresh (the log names them).
    """
    model = build_model(cfg.model, num_classes=len(categories) + 1)
    if cfg.train.weights:
        weights = require_file(cfg.train.weights, "train.weights", WEIGHTS_WANTED)
        load_weights(model, weights, categories, for_training=True)
    return model.to(device).to(memory_format=torch.channels_last)


def bucket_list(data_cfg: Config) -> list[tuple[int, int]]:
    """The padded (h, w) shapes the loader produces under static shapes (the same rule as the loader)."""
    buckets = bucket_shapes(data_cfg.min_size, data_cfg.max_size, data_cfg.size_divisibility, data_cfg.buckets)
    return sorted(set(buckets.values()))


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in state_dict order: equal digests, identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_parameter_digests(model: torch.nn.Module, ctx: DistributedContext) -> list[str]:
    """Every rank's `parameter_digest`, in rank order."""
    mine = parameter_digest(model)
    if not ctx.is_distributed:
        return [mine]
    digests: list[str] = [""] * ctx.world_size
    dist.all_gather_object(digests, mine)
    return digests


def gather_positions(position: Any, ctx: DistributedContext) -> list[Any] | None:
    """Every rank's pipeline position (rank order) for rank 0's checkpoint; None at an epoch end."""
    if position is None:
        return None
    if not ctx.is_distributed:
        return [position]
    positions: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(positions, position)
    return positions


def this_ranks_position(positions: list[Any] | None, ctx: DistributedContext, path: Path) -> Any:
    """This rank's saved pipeline position; a mid-epoch checkpoint needs the same process count."""
    if positions is None:
        return None
    if len(positions) != ctx.world_size:
        raise CheckpointError(
            f"checkpoint {path} was written mid-epoch by {len(positions)} processes, this run has {ctx.world_size}; "
            f"resume with {len(positions)} processes or from an epoch-end checkpoint"
        )
    return positions[ctx.rank]
