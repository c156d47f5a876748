"""A run's inputs from the frozen config: the paths it reads, checked up front, and its loaders.

Shared by `train/main.py` and the dry runs (`train/dry_run.py`), so both read exactly the same
data. Every function takes what it needs as arguments; nothing reads env vars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.batch import bucket_shapes
from pipeline.loader import Loader, build_loader
from pipeline.shard_format import read_manifest
from train.config import Config, ConfigError
from train.distributed import DistributedContext, per_rank_batch

WEIGHTS_WANTED = "a trainer checkpoint, a torchvision ResNet-50 or Mask R-CNN state dict, or Detectron's R-50.pkl"


def require_shards(path: str, key: str, alternative: str = "") -> Path:
    """A shard folder named by `key` must exist and hold a manifest; `alternative` says what else would do."""
    if not path:
        raise ConfigError(f"{key} is empty; pass a shard folder written by tools/shard_coco.py{alternative}")
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
    This is the one check of `train.weights` before anything is written; the model build reads
    the file (model/weights.py says what it may hold).
    """
    train_shards = require_shards(cfg.data.train_shards, "data.train_shards (--data)")
    # Eval shards keep images without objects and leave crowd regions out: training on them
    # runs without a word but is not the reference's training set.
    if read_manifest(train_shards).get("mode") == "eval":
        raise ConfigError(
            f"data.train_shards (--data)={cfg.data.train_shards} holds shards made with --mode eval; "
            "train on shards made with tools/shard_coco.py --mode train"
        )
    if cfg.eval.every_epochs:
        no_evaluation = ", or train without evaluation with eval.every_epochs=0"
        require_shards(cfg.data.val_shards, "data.val_shards (--val-data)", no_evaluation)
        require_file(
            cfg.data.val_annotations, "data.val_annotations (--val-annotations)",
            f"the instances JSON of the val shards{no_evaluation}",
        )
    if cfg.train.weights:
        require_file(cfg.train.weights, "train.weights", WEIGHTS_WANTED)


def build_data_loader(cfg: Config, ctx: DistributedContext, *, training: bool) -> Loader:
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


def bucket_list(data_cfg: Config) -> list[tuple[int, int]]:
    """The padded (h, w) shapes the loader produces under static shapes (the same rule as the loader)."""
    buckets = bucket_shapes(data_cfg.min_size, data_cfg.max_size, data_cfg.size_divisibility, data_cfg.buckets)
    return sorted(set(buckets.values()))
