"""Per-stage wall-clock totals of an input pipeline, cheap enough to leave on (a few perf_counter calls per batch).

Stages: `read` (bytes from the shards), `decode` (JPEG -> pixels), `augment` (flip, resize,
pad), `collate` (batch assembly and the copy to the device) and `wait` (time the
consumer spent blocked waiting for the next batch). Stages that run inside DALI's own threads
(decode, augment) are not visible to Python: for the DALI backend they are reported as None,
and `wait` holds what they cost the consumer after prefetching (with the reads of the batches
fed meanwhile, which happen on the consumer's thread); `tools/bench_pipeline.py --stages`
measures them separately.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

STAGES = ("read", "decode", "augment", "collate", "wait")


class StageTimer:
    def __init__(self, hidden: tuple[str, ...] = ()):
        self.hidden = hidden  # stages measured elsewhere (inside DALI), reported as None
        self.reset()

    def reset(self) -> None:
        self.totals = {stage: 0.0 for stage in STAGES}
        self.images = 0

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] += seconds

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] += time.perf_counter() - start

    def count(self, images: int) -> None:
        self.images += images

    def report(self) -> dict[str, object]:
        """{'images': n, 'total_s': {stage: s}, 'per_image_ms': {stage: ms}}; hidden stages are None."""
        per_image = 1000.0 / self.images if self.images else 0.0
        return {
            "images": self.images,
            "total_s": {s: None if s in self.hidden else t for s, t in self.totals.items()},
            "per_image_ms": {s: None if s in self.hidden else t * per_image for s, t in self.totals.items()},
        }
