"""What a loader needs from the `data` config section, resolved once into plain values.

Backends take a `LoaderSettings`, never the config, so tests and tools can build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.transforms import bucket_shapes

BACKENDS = ("dali", "torch")
DECODE_DEVICES = ("auto", "gpu", "cpu")


@dataclass(frozen=True)
class LoaderSettings:
    min_size: int
    max_size: int
    size_divisibility: int
    buckets: dict[str, tuple[int, int]] | None  # padded (h, w) per orientation group; None: pad per batch
    flip_prob: float  # 0 in evaluation
    decode_device: str  # auto | gpu | cpu
    num_threads: int  # DALI threads / DataLoader workers
    prefetch: int  # batches prepared ahead
    shuffle_buffer: int  # 0 in evaluation


def settings_from_config(data_cfg: Any, training: bool) -> LoaderSettings:
    """Read the `data` section (a train.config.Config); raises ValueError naming a bad key."""
    if data_cfg.decode_device not in DECODE_DEVICES:
        raise ValueError(f"data.decode_device must be one of {DECODE_DEVICES}, got {data_cfg.decode_device!r}")
    if not 0.0 <= data_cfg.flip_prob <= 1.0:
        raise ValueError(f"data.flip_prob must lie in [0, 1], got {data_cfg.flip_prob}")
    buckets = None
    if data_cfg.static_shapes:
        buckets = bucket_shapes(
            data_cfg.min_size, data_cfg.max_size, data_cfg.size_divisibility, data_cfg.buckets
        )
    return LoaderSettings(
        min_size=int(data_cfg.min_size),
        max_size=int(data_cfg.max_size),
        size_divisibility=int(data_cfg.size_divisibility),
        buckets=buckets,
        flip_prob=float(data_cfg.flip_prob) if training else 0.0,
        decode_device=data_cfg.decode_device,
        num_threads=max(int(data_cfg.num_threads), 1),
        prefetch=max(int(data_cfg.prefetch), 1),
        shuffle_buffer=int(data_cfg.shuffle_buffer) if training else 0,
    )
