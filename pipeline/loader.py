"""The one entry point the trainer and evaluator call: `build_loader(...) -> Loader`.

A Loader yields `Batch`es (pipeline/batch.py) on `device`, images channels_last, one epoch per
iteration:

- `len(loader)`: batches per rank per epoch, from the manifest's counts (pipeline/epoch_plan.py).
- `set_epoch(epoch)`: select the epoch; the data order is a function of (seed, epoch, rank) only.
  Iterating again without `set_epoch` repeats the same epoch.
- Training: shuffled, one flip coin per image with probability `data.flip_prob`.
  Evaluation: no flip, no shuffle, every image exactly once over all ranks; the last batches of
  a rank may be padded by repeating its last sample, so padded entries are image ids already
  yielded earlier by the same rank: the evaluator dedupes by image id.
- `state_dict()` / `load_state_dict()`: mid-epoch resume. After loading, the next iteration
  yields exactly the batches an uninterrupted epoch would have yielded after the saved position
  (both backends replay the epoch plan, pipeline/epoch_plan.py, reading nothing before the
  position). `set_epoch` with the saved epoch keeps it.
- `timings()`: per-stage totals and per-image milliseconds (pipeline/timing.py).

Batches belong to the consumer: they are copied out of the pipeline's buffers into fresh
tensors (pipeline/transforms.py `pad_images` says why a fresh CPU buffer costs no more than a
reused one), so a batch may be kept as long as the consumer likes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from pipeline.batch import Batch
from pipeline.settings import BACKENDS, LoaderSettings, settings_from_config
from pipeline.shard_set import open_shard_set


class Loader(Protocol):
    manifest: dict[str, Any]

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def timings(self) -> dict[str, object]: ...


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_loader(
    data_cfg: Any,
    shard_dir: str | Path,
    *,
    training: bool,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    settings: LoaderSettings | None = None,
) -> Loader:
    """A loader over the shards in `shard_dir` for one rank.

    `data_cfg` is the config's `data` section; `backend` overrides `data.backend` (dali | torch),
    and `settings` overrides everything read from `data_cfg` (tools and tests).
    Raises ShardReadError (a ValueError) with one sentence naming the bad file for unusable shards.
    """
    backend = backend or data_cfg.backend
    if backend not in BACKENDS:
        raise ValueError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "dali" and not dali_available():
        raise ValueError("data.backend=dali needs nvidia-dali (pip install -e '.[dali]'); or pass data.backend=torch")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    settings = settings or settings_from_config(data_cfg, training)
    if settings.decode_device == "gpu" and device.type != "cuda":
        raise ValueError("data.decode_device=gpu needs a CUDA training device; use data.decode_device=auto or cpu")
    shard_set = open_shard_set(shard_dir)
    for group, shards in shard_set.groups.items():
        if 0 < shards.samples < world_size:
            # The plan pads a rank's range by repeating its last sample; a rank with nothing to read cannot pad.
            raise ValueError(
                f"{shard_dir}: the {group} group has {shards.samples} samples, fewer than the {world_size} ranks; "
                f"use fewer ranks or more images"
            )
    kwargs = dict(
        training=training, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device
    )
    if backend == "dali":
        from pipeline.dali_pipeline import DaliLoader

        return DaliLoader(shard_set, settings, **kwargs)
    from pipeline.torch_loader import TorchLoader

    return TorchLoader(shard_set, settings, **kwargs)
