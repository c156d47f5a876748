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

Timing (`StageTimer`, cheap enough to leave on: two clock reads and a dict update per span, nothing
kept per span), by stage: `read` (bytes from the shards, the per-sample check, the sample's record),
`decode` (JPEG -> pixels), `augment` (flip and resize), `collate` (batch assembly, padding and
the copy to the device) and `wait` (time the consumer spent blocked waiting for the next batch).
The stages are sums of named spans (`STAGE_OPS`), the same spans that a trace keeps when the
timer is `tracing` (train/trace.py): one measurement for both. Stages that run inside DALI's
own threads (decode, augment) are not visible to Python: for the DALI backend they are reported
as None, and `wait` holds what they cost the consumer after prefetching (with the reads of the
batches fed meanwhile, which happen on the consumer's thread); `tools/bench_pipeline.py
--stages` measures them separately.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from pipeline.batch import Batch, SampleRecord, bucket_shapes, make_batch, sample_record
from pipeline.epoch_plan import epoch_plan, group_batches
from pipeline import BACKENDS, DECODE_DEVICES
from pipeline.shard_format import SampleRef, ShardSet, checked_sample, open_shard_set, read_members


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
    timer: "StageTimer"

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
# The ops (named spans) whose totals make each stage. Only these count towards a stage: the
# spans that group others (`sample`, `feed`, the children of `collate`) are in the trace only.
STAGE_OPS = {
    "read": ("read", "check", "record"),
    "decode": ("decode",),
    "augment": ("resize_flip",),
    "collate": ("collate", "to_device"),
    "wait": ("wait",),
}


class ThreadSpans:
    """One thread's (or one worker's) share of a `StageTimer`: op totals and, while tracing, its spans.

    `spans` holds (op id, start ns, end ns) triples flat in an int64 array, so keeping a span
    allocates no Python object; `flights` the same for intervals that overlap one another
    (DALI's batches in flight), which a trace shows as async slices instead of nested ones.
    """

    __slots__ = ("pid", "tid", "process", "thread", "totals", "spans", "flights", "open")

    def __init__(self, pid: int, tid: int, process: str, thread: str):
        self.pid, self.tid, self.process, self.thread = pid, tid, process, thread
        self.totals: dict[int, int] = {}  # op id -> ns
        self.spans = array("q")
        self.flights = array("q")
        self.open: list[int] = []  # start times of the spans this thread is inside

    def add(self, op: int, start: int, end: int, tracing: bool) -> None:
        self.totals[op] = self.totals.get(op, 0) + end - start
        if tracing:
            spans = self.spans
            spans.append(op)
            spans.append(start)
            spans.append(end)


class _Span:
    """The context manager `StageTimer.measure(op)` returns: one per op, reused (no object made per span)."""

    __slots__ = ("timer", "op")

    def __init__(self, timer: "StageTimer", op: int):
        self.timer, self.op = timer, op

    def __enter__(self) -> None:
        self.timer.this_thread().open.append(time.perf_counter_ns())

    def __exit__(self, *exc: object) -> None:
        end = time.perf_counter_ns()
        log = self.timer.this_thread()
        log.add(self.op, log.open.pop(), end, self.timer.tracing)


@dataclass
class TakenSpans:
    """What a DataLoader worker's timer hands back with each sample (`StageTimer.take`), for `merge`."""

    pid: int
    tid: int
    process: str
    thread: str
    ops: list[str]  # op id -> name in the worker's timer
    totals: dict[int, int]
    spans: array


class StageTimer:
    """Where a loader's time goes, measured once: named spans (`measure(op)`) on every thread.

    Each span adds its nanoseconds (time.perf_counter_ns: CLOCK_MONOTONIC, one clock for every
    process on the machine) to its op's total; `report()` sums the ops of each stage
    (`STAGE_OPS`). That is always on: two clock reads and a dict update per span, nothing kept.
    With `tracing` on, every span is also kept with its start and end, per thread, for a Chrome
    trace and the per-op table (train/trace.py); the trace's op totals are then exactly these
    totals over the same spans. DataLoader workers time into their own timer and send its
    `take()` back with each sample, which the loader's timer `merge`s under the worker's track.
    """

    def __init__(self, hidden: tuple[str, ...] = ()):
        self.hidden = hidden  # stages measured elsewhere (inside DALI), reported as None
        self.tracing = False
        self.ops: list[str] = []  # op id -> name
        self._spans: dict[str, _Span] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # .log: this thread's ThreadSpans
        self._threads: dict[tuple[int, int], ThreadSpans] = {}  # (pid, native thread id) -> its spans
        self.images = 0
        self.traced_images = 0  # images counted while tracing: what a trace's per-image figures divide by

    def __getstate__(self) -> dict[str, Any]:
        return {"hidden": self.hidden}  # a copy for another process starts empty

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["hidden"])

    def measure(self, op: str) -> AbstractContextManager:
        """`with timer.measure(op):` times the block as one span of `op` on this thread."""
        span = self._spans.get(op)
        return span if span is not None else self._register(op)

    def record(self, op: str, start_ns: int, end_ns: int) -> None:
        """A span of `op` measured by the caller (perf_counter_ns values), on this thread."""
        self.this_thread().add(self.measure(op).op, start_ns, end_ns, self.tracing)

    def record_flight(self, op: str, start_ns: int, end_ns: int) -> None:
        """An interval that may overlap others of its kind (a DALI batch in flight); kept only while tracing."""
        if self.tracing:
            self.this_thread().flights.extend((self.measure(op).op, start_ns, end_ns))

    def count(self, images: int) -> None:
        self.images += images
        if self.tracing:
            self.traced_images += images

    def this_thread(self) -> ThreadSpans:
        log = getattr(self._local, "log", None)
        if log is None:
            log = self._local.log = self._track(os.getpid(), threading.get_native_id(), PROCESS, thread_name())
        return log

    def take(self, process: str, thread: str) -> TakenSpans:
        """This thread's totals and spans since the last take, handed over and cleared (a worker, per sample)."""
        log = self.this_thread()
        taken = TakenSpans(log.pid, log.tid, process, thread, list(self.ops), log.totals, log.spans)
        log.totals, log.spans = {}, array("q")
        return taken

    def merge(self, taken: TakenSpans) -> None:
        """Add a worker's `take()` under its own track: its totals count in `report()`, its spans in the trace."""
        log = self._track(taken.pid, taken.tid, taken.process, taken.thread)
        ids = [self.measure(name).op for name in taken.ops]
        for op, ns in taken.totals.items():
            log.totals[ids[op]] = log.totals.get(ids[op], 0) + ns
        spans = taken.spans
        for i in range(0, len(spans), 3):
            log.spans.extend((ids[spans[i]], spans[i + 1], spans[i + 2]))

    def threads(self) -> list[ThreadSpans]:
        with self._lock:
            return list(self._threads.values())

    def op_totals_ns(self) -> dict[str, int]:
        """Every op's total over all threads and workers, in ns."""
        totals: dict[str, int] = {}
        for log in self.threads():
            for op, ns in list(log.totals.items()):
                totals[self.ops[op]] = totals.get(self.ops[op], 0) + ns
        return totals

    def report(self) -> dict[str, object]:
        """{'images': n, 'total_s': {stage: s}, 'per_image_ms': {stage: ms}}; hidden stages are None."""
        ops = self.op_totals_ns()
        totals = {stage: sum(ops.get(op, 0) for op in STAGE_OPS[stage]) / 1e9 for stage in STAGES}
        per_image = 1000.0 / self.images if self.images else 0.0
        return {
            "images": self.images,
            "total_s": {s: None if s in self.hidden else t for s, t in totals.items()},
            "per_image_ms": {s: None if s in self.hidden else t * per_image for s, t in totals.items()},
        }

    def _register(self, op: str) -> _Span:
        with self._lock:
            if op not in self._spans:
                self._spans[op] = _Span(self, len(self.ops))
                self.ops.append(op)
            return self._spans[op]

    def _track(self, pid: int, tid: int, process: str, thread: str) -> ThreadSpans:
        with self._lock:
            log = self._threads.get((pid, tid))
            if log is None:
                log = self._threads[(pid, tid)] = ThreadSpans(pid, tid, process, thread)
            return log


PROCESS = "main process"  # the track name of the loader's own process (workers: "loader worker N")


def thread_name() -> str:
    name = threading.current_thread().name
    return "main thread" if name == "MainThread" else name


def read_record(ref: SampleRef, flip: bool, settings: LoaderSettings, timer: StageTimer) -> tuple[SampleRecord, bytes]:
    """One sample's record and JPEG bytes, as both backends read it: `read`, `check` and `record` spans."""
    with timer.measure("read"):
        members = read_members(ref)
    with timer.measure("check"):
        sample = checked_sample(ref, members)
    with timer.measure("record"):
        record = sample_record(sample, ref.tar, flip, settings.min_size, settings.max_size)
    return record, sample.jpeg


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

    def _collate(
        self, records: list[SampleRecord], images: list[torch.Tensor], group: str
    ) -> tuple[Batch, torch.cuda.Event | None]:
        """The batch on the device (`collate` and `to_device` spans), and the event after its copies (`_copies_done`)."""
        with self.timer.measure("collate"):
            batch = make_batch(
                records,
                images,
                maxima=self.maxima,
                bucket=None if self.settings.buckets is None else self.settings.buckets[group],
                size_divisibility=self.settings.size_divisibility,
                device=self.device,
                measure=self.timer.measure,
            )
        with self.timer.measure("to_device"):
            batch = batch.to(self.device, non_blocking=True)
        return batch, self._copies_done()

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
