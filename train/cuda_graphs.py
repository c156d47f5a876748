"""When to capture the model's static part (backbone + FPN + RPN head) as CUDA graphs.

With static shapes every training batch is one of a few bucket shapes, so the static part
sees a fixed input shape per bucket and can be replayed from a CUDA graph with one launch
instead of hundreds. The capture itself belongs to the model (`StaticPart.capture`, which
keeps the graphs and replays them only in training mode: model/maskrcnn.py); this module
decides whether the run captures, and for which shapes. Anything else (CPU, dynamic shapes,
graphs turned off) runs eagerly, and the reason is returned for the log.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

from torch import nn

from train.config import Config
from train.distributed import DistributedContext, per_rank_batch
from train.inputs import bucket_list


def graph_static_part(
    model: nn.Module,
    cfg: Config,
    ctx: DistributedContext,
    autocast: Callable[[], contextlib.AbstractContextManager],
    buckets: Sequence[tuple[int, int]] | None = None,
) -> str:
    """Capture `model.static_part` per bucket when the run asks for it; returns what was done, or why not, for the log.

    `autocast` must be the training step's (`TrainingStep.autocast`, built with
    cuda_graphs=True): a graph replays only under the autocast state it was captured in.
    `buckets`: the shapes to capture (default: every bucket the loader produces; a throughput
    run that times one shape captures that one only).
    """
    if not cfg.train.cuda_graphs:
        return "eager: train.cuda_graphs is false"
    if ctx.device.type != "cuda":
        return "eager: CUDA graphs need a CUDA device"
    if not cfg.data.static_shapes:
        return "eager: data.static_shapes is false, so input shapes vary"
    buckets = list(buckets) if buckets is not None else bucket_list(cfg.data)
    images_per_rank = per_rank_batch(cfg.solver.ims_per_batch, ctx.world_size, "solver.ims_per_batch")
    model.static_part.capture(buckets, images_per_rank, autocast)
    shapes = ", ".join(f"{h}x{w}" for h, w in buckets)
    return f"CUDA graphs: static part captured for {images_per_rank} images per rank at {shapes}"
