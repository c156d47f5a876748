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
- `timings()`: per-stage totals and per-image milliseconds (`StageTimer`).

Batches belong to the consumer: they are copied out of the pipeline's buffers into fresh
tensors (pipeline/batch.py `pad_images` says why a fresh CPU buffer costs no more than a
reused one), so a batch may be kept as long as the consumer likes.

The backends (pipeline/dali_pipeline.py, pipeline/torch_loader.py) take a `LoaderSettings` (what
they need from the `data` config section, resolved once into plain values), never the config, so
tests and tools can build one directly. `LoaderBase` holds the constructor's fields, the epoch
and the position within it, the resume point loaded but not iterated yet, the stage timer, and
the side stream the batches are copied to the device on, with the hand-over of a batch from that
stream to the consumer's. A backend only says how an epoch's batches are made from a start
position (`_epoch_batches`): both replay the epoch plan (pipeline/epoch_plan.py) from there, so
the epoch and the position are the whole mid-epoch state.

Timing (`StageTimer`, cheap enough to leave on: a few perf_counter calls per batch), by stage:
`read` (bytes from the shards), `decode` (JPEG -> pixels), `augment` (flip, resize, pad),
`collate` (batch assembly and the copy to the device) and `wait` (time the consumer spent
blocked waiting for the next batch). Stages that run inside DALI's own threads (decode, augment)
are not visible to Python: for the DALI backend they are reported as None, and `wait` holds what
they cost the consumer after prefetching (with the reads of the batches fed meanwhile, which
happen on the consumer's thread); `tools/bench_pipeline.py --stages` measures them separately.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from pipeline.batch import Batch, bucket_shapes
from pipeline.epoch_plan import epoch_plan, group_batches
from pipeline import BACKENDS, DECODE_DEVICES
from pipeline.shard_format import ShardSet, open_shard_set


class LoaderWorkerLost(RuntimeError):
    """A worker process of the loader died (the kernel's OOM killer sends SIGKILL): raised when the
    consumer asks for the next batch, so the batches handed over so far, and the loader's position
    after them, are consistent; the message says what died and what to lower."""


@dataclass(frozen=True)
class LoaderSettings:
    min_size: int
    max_size: int
    size_divisibility: int
    buckets: dict[str, tuple[int, int]] | None  # padded (h, w) per orientation group; None: pad per batch
    flip_prob: float  # 0 in evaluation
    decode_device: str  # auto | gpu | cpu
    dali_threads: int  # DALI's CPU threads, at least 1
    torch_workers: int  # the torch backend's DataLoader worker processes; 0: the consumer's process
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
        dali_threads=max(int(data_cfg.dali_threads), 1),
        torch_workers=int(data_cfg.torch_workers),
        prefetch=max(int(data_cfg.prefetch), 1),
        shuffle_buffer=int(data_cfg.shuffle_buffer) if training else 0,
    )


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


class LoaderBase:
    """Iterable over `Batch` for one rank; see the module doc for the contract."""

    HIDDEN_STAGES: tuple[str, ...] = ()  # stages the backend cannot time from Python (`StageTimer`)

    def __init__(
        self,
        shard_set: ShardSet,
        settings: LoaderSettings,
        *,
        training: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
    ):
        self.shard_set = shard_set
        self.manifest = shard_set.manifest
        self.settings = settings
        self.training = training
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = device
        self.decode_on_device = device.type == "cuda" and settings.decode_device != "cpu"
        self.batches = group_batches(shard_set.samples, world_size, batch_size)
        self.timer = StageTimer(hidden=self.HIDDEN_STAGES)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Ground truth never exceeds these per image (`make_batch` pads per batch up to them).
        self.maxima = tuple(max(m, 1) for m in (shard_set.max_instances, shard_set.max_polygons, shard_set.max_vertices))
        self._epoch = 0
        self._position = 0  # batches of the current epoch already handed out
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return sum(self.batches.values())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields; keeps a loaded resume point for that same epoch."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        self._epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the batches already yielded in it: enough to continue it exactly."""
        if self._resume is not None:  # loaded but not iterated yet
            return dict(self._resume)
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration continues epoch `state['epoch']` after its first `position` batches."""
        self._resume = dict(state)
        self._epoch = state["epoch"]

    def timings(self) -> dict[str, object]:
        return self.timer.report()

    def __iter__(self) -> Iterator[Batch]:
        resume, self._resume = self._resume, None
        start = resume["position"] if resume is not None else 0
        self._position = start
        for batch in self._epoch_batches(self._epoch, start):
            self.timer.count(len(batch))
            self._position += 1
            yield batch

    def _plan(self, epoch: int) -> list[list[tuple[str, int, bool]]]:
        """This rank's batches of `epoch` as (group, sample position, flip) entries (pipeline/epoch_plan.py)."""
        return epoch_plan(
            self.shard_set,
            training=self.training,
            flip_prob=self.settings.flip_prob,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
        )

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """Batches `start`, `start + 1`, ... of `epoch` (a resume starts past 0)."""
        raise NotImplementedError

    def _on_copy_stream(self) -> AbstractContextManager:
        """Where a batch's device work runs: the side stream on CUDA (on any thread), so it overlaps compute."""
        if self._copy_stream is None:
            return nullcontext()
        on_device = ExitStack()  # a producer thread starts on the default device and stream
        on_device.enter_context(torch.cuda.device(self.device))
        on_device.enter_context(torch.cuda.stream(self._copy_stream))
        return on_device

    def _copies_done(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on the copy stream; None on the CPU.

        Recorded by the thread that queued a batch's copies, so the consumer waits for that
        batch only, not for the next one a producer thread may already be copying.
        """
        if self._copy_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._copy_stream)
        return event

    def _hand_over(self, batch: Batch, copies_done: torch.cuda.Event | None) -> Batch:
        """On the consumer's thread: its stream waits for the batch's copies, whose memory then
        stays allocated until the work it queues after this point is done (record_stream)."""
        if copies_done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copies_done)
            for value in vars(batch).values():
                value.record_stream(current)
        return batch
