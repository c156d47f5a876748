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

import torch
from torch import nn


def graph_static_part(
    model: nn.Module,
    *,
    enabled: bool,
    device: torch.device,
    static_shapes: bool,
    buckets: Sequence[Sequence[int]],
    images_per_rank: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> str:
    """Capture `model.static_part` per bucket; returns what was done, or why not, for the log.

    `autocast` must be the training step's context, built with cache_enabled=False (autocast's
    weight-cast cache cannot live across graph capture and replay): a graph replays only under
    the autocast state it was captured in.
    """
    if not enabled:
        return "eager: train.cuda_graphs is false"
    if device.type != "cuda":
        return "eager: CUDA graphs need a CUDA device"
    if not static_shapes:
        return "eager: data.static_shapes is false, so input shapes vary"
    for height, width in buckets:
        sample = torch.randint(0, 256, (images_per_rank, 3, height, width), dtype=torch.uint8, device=device)
        sample = sample.contiguous(memory_format=torch.channels_last)
        sizes = torch.tensor([[height, width]] * images_per_rank, dtype=torch.int32, device=device)
        with autocast():
            model.static_part.capture(sample, sizes)
    shapes = ", ".join(f"{h}x{w}" for h, w in buckets)
    return f"CUDA graphs: static part captured for {images_per_rank} images per rank at {shapes}"
