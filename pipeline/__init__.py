"""The input pipeline: shards -> `Batch`es on the training device (pipeline/loader.py is the entry point).

The loader's choices are plain data here, importable without torch, so that the config is
validated (train/config_schema.py) before a tool pays for the heavy imports.
"""

from __future__ import annotations

from typing import Sequence

BACKENDS = ("dali", "torch")  # data.backend: NVIDIA DALI, or the torchvision fallback (pipeline/torch_loader.py)
DECODE_DEVICES = ("auto", "gpu", "cpu")  # data.decode_device


def bucket_problem(
    min_size: int, max_size: int, size_divisibility: int, configured: Sequence[Sequence[int]]
) -> str | None:
    """What makes `configured` buckets (data.buckets) no list of shapes to pad to, or None.

    A bucket listed twice is a slip; one smaller than the largest resized image of both orientations
    (min_size x max_size, or its transpose) could never be used, and would be passed over for the
    tight bucket without a word.
    """
    largest = {"landscape": (min_size, max_size), "portrait": (max_size, min_size)}
    seen: set[tuple[int, int]] = set()
    for h, w in configured:
        if (h, w) in seen:
            return f"lists [{h}, {w}] twice"
        seen.add((h, w))
        if not any(h >= big_h and w >= big_w for big_h, big_w in largest.values()):
            return (
                f"holds [{h}, {w}], smaller than the largest resized images (with data.min_size={min_size} and "
                f"data.max_size={max_size}: {min_size}x{max_size} landscape, {max_size}x{min_size} portrait)"
            )
    return None
