"""The torch fallback: the same `Batch` contract without DALI, and the in-repo baseline for benchmarks.

Stages follow the DALI pipeline: read a sample -> decode (torchvision.io.decode_jpeg, on the GPU
when the training device is CUDA, after the work already queued on the stream: see
`wait_before_decoding`) -> flip and resize the image with the sample's coin
-> scale, flip and pad the ground truth and pad the images per batch, in uint8, with the code
the DALI backend uses (pipeline/batch.py). DataLoader workers do the per-sample work on the CPU.

A producer thread (`prefetched`) finishes each batch (the GPU decode and resize when the device
is CUDA, the padding, the copies to the device, on a side stream) up to `data.prefetch` batches
ahead of the training thread, which so only waits for a batch that is already there. Its
exceptions reach the consumer at the item where they happened; closing the consumer's generator
(or dropping it) stops the producer and waits for it, so the same source can be iterated again
right after, as a resumed or a new epoch does.

Which samples, in which order and with which coins, is the epoch plan both backends share
(pipeline/epoch_plan.py); samples are read by random access (pipeline/shard_format.py).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import queue
import re
import signal
import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.batch import Batch, decode_image, transform_image
from pipeline.loader import PROCESS, LoaderBase, LoaderSettings, LoaderWorkerLost, StageTimer, read_record, thread_name
from pipeline.shard_format import SampleRef, ShardReadError, ShardSet, sample_refs, shard_error

T = TypeVar("T")
_END = object()
_POLL_S = 0.05  # how often a blocked producer checks whether the consumer has gone


class ShardSamples(torch.utils.data.Dataset):
    """Map-style dataset: (group, position, flip) -> one transformed sample, or the error it raised.

    Each sample carries its `spans` (its timer's `take()`: the op totals, and while `tracing` the
    spans themselves), which the loader's timer merges: a worker process times into its own copy
    of the timer, on the same clock as the main process. `tracing` is shared memory, so the
    workers follow the loader's timer as it changes (the loader copies it once per batch).
    """

    def __init__(self, refs: dict[str, Sequence[SampleRef]], settings: LoaderSettings, decode: bool):
        self.refs = refs
        self.settings = settings
        self.decode = decode  # False: hand the JPEG bytes to the main process (GPU decode)
        self.timer = StageTimer()
        self.tracing = multiprocessing.RawValue(ctypes.c_bool, False)

    def __getitem__(self, item: tuple[str, int, bool]) -> dict[str, Any]:
        group, position, flip = item
        self.timer.tracing = self.tracing.value
        try:
            with self.timer.measure("sample"):
                out = self._load(self.refs[group][position], flip)
        except ShardReadError as e:
            out = {"error": e}  # raised in the main process, as one sentence
        worker = torch.utils.data.get_worker_info()
        track = (f"loader worker {worker.id}", "worker") if worker is not None else (PROCESS, thread_name())
        out["spans"] = self.timer.take(*track)
        return out

    def _load(self, ref: SampleRef, flip: bool) -> dict[str, Any]:
        record, jpeg = read_record(ref, flip, self.settings, self.timer)
        out = {"record": record, "jpeg": torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)}
        if self.decode:
            decode_and_transform([out], torch.device("cpu"), self.timer)
        return out


def wait_before_decoding(device: torch.device) -> None:
    """On CUDA: wait until the work queued on the current stream has run, before a decode writes anything.

    torchvision's CUDA `decode_jpeg` allocates its outputs on the caller's current stream but
    writes them from a private stream (or nvJPEG's hardware engine), which does not wait for
    the caller's stream (pytorch/vision PR #9606). The caching allocator hands a block freed on
    a stream straight to the next allocation on it, so the decoder can be given a block that
    kernels queued on this stream (the previous batch's resize and padding) have yet to read,
    and overwrite it. Once the stream's queued work has run, no freed block is still in use.
    The decode already holds the producer thread until its own stream is done; this makes it
    wait for the stream's earlier work first (the previous batch's resize, padding and copies).
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, h, w] RGB images from JPEG bytes (uint8 [n] each), decoded on `device` (batched on CUDA)."""
    wait_before_decoding(device)
    return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


def decode_and_transform(samples: list[dict[str, Any]], device: torch.device, timer: StageTimer) -> None:
    """Decode each sample's JPEG on `device` (batched on CUDA) and apply its flip and resize, in place."""
    with timer.measure("decode"):
        try:
            images = decode_jpegs([s["jpeg"] for s in samples], device)
        except RuntimeError:
            images = [decode_image(s["jpeg"], s["record"].source, device) for s in samples]  # name the one that fails
    for sample, image in zip(samples, images):
        record = sample["record"]
        if tuple(image.shape[1:]) != record.original:
            tar, key = record.source
            raise shard_error(tar, f"the JPEG is {tuple(image.shape[1:])} but its json says {record.original}", key)
        with timer.measure("resize_flip"):
            sample["image"] = transform_image(image, record.resized, record.flipped)
        del sample["jpeg"]


def collate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the samples as a list; images are padded once they exist (after a GPU decode, if any)."""
    return samples


class _PlanSampler:
    """The batch sampler handed to the DataLoader: the current epoch's remaining plan."""

    def __init__(self):
        self.batches: list[list[tuple[str, int, bool]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchLoader(LoaderBase):
    """Iterable over `Batch` for one rank; see pipeline/loader.py for the contract."""

    def __init__(self, shard_set: ShardSet, settings: LoaderSettings, **placement: Any):
        """`placement`: the keywords of `LoaderBase` (training, batch_size, rank, world_size, seed, device)."""
        super().__init__(shard_set, settings, **placement)
        self._sampler = _PlanSampler()
        workers = settings.torch_workers
        self._samples = ShardSamples(sample_refs(shard_set), settings, decode=not self.decode_on_device)
        self._loader = torch.utils.data.DataLoader(
            self._samples,
            batch_sampler=self._sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=settings.prefetch if workers > 0 else None,
        )

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """The epoch's plan from batch `start` on: a resume replays the plan, skipping batches without decoding.

        Batches are finished on the producer thread; the position the loader saves counts the
        batches handed over here, so a state taken mid-epoch never skips the prefetched ones.
        """
        self._sampler.batches = self._plan(epoch)[start:]
        groups = [entries[0][0] for entries in self._sampler.batches]
        # The worker processes start (fork) here, on the consumer's thread, not on the producer's.
        self._samples.tracing.value = self.timer.tracing  # the workers trace while the timer does (copied per batch)
        with worker_deaths(), deferred_worker_errors():
            samples = iter(self._loader)  # persistent workers wait here for the epoch's first samples
        ready = prefetched(
            lambda: (self._finish(next(samples), group) for group in groups),
            depth=self.settings.prefetch,
            context=self._on_copy_stream,
        )
        try:
            while True:
                self._samples.tracing.value = self.timer.tracing
                with self.timer.measure("wait"), worker_deaths():
                    item = next(ready, None)
                if item is None:
                    return
                yield self._hand_over(*item)
        finally:
            ready.close()

    def _finish(self, samples: list[dict[str, Any]], group: str) -> tuple[Batch, Any]:
        """On the producer thread, inside `_on_copy_stream`: the batch on the device, and its copies' event."""
        for s in samples:
            self.timer.merge(s.pop("spans"))
        for s in samples:
            if "error" in s:
                raise s["error"]
        if self.decode_on_device:
            decode_and_transform(samples, self.device, self.timer)
        return self._collate([s["record"] for s in samples], [s["image"] for s in samples], group)


@contextmanager
def worker_deaths() -> Iterator[None]:
    """A DataLoader worker's death, as `LoaderWorkerLost`: torch's error for a worker that exited, or the
    broken connection met when a batch the dead worker had queued is received (its tensors' file
    descriptors go through a connection to that worker)."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as e:
        text = " ".join(str(e).split())
        if isinstance(e, RuntimeError) and not re.search(r"DataLoader worker .* (exited unexpectedly|is killed by)", text):
            raise  # an error of the work itself, which torch re-raises from the worker
        raise LoaderWorkerLost(
            f"a worker process of the torch loader died ({text or type(e).__name__}); when memory runs out, the "
            "kernel's OOM killer ends one so: lower data.torch_workers or data.prefetch"
        ) from None


@contextmanager
def deferred_worker_errors() -> Iterator[None]:
    """Starting the DataLoader's workers without torch's SIGCHLD handler.

    That handler raises a dead worker's error in the main thread wherever it is, say halfway
    through an optimizer step, which no checkpoint could then keep. Without it the DataLoader
    still finds the dead worker when the next batch is fetched (it checks its workers while it
    waits), and the consumer gets `LoaderWorkerLost` between two steps.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # torch installs no handler off the main thread
        return
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def prefetched(
    make_items: Callable[[], Iterator[T]],
    depth: int,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> Iterator[T]:
    """Iterate `make_items()` on a producer thread, at most `depth` items ahead of the consumer.

    `context()` is entered on the producer thread around the whole iteration (for the CUDA
    device and side stream its work must be queued on).
    """
    items: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with context():
                source = make_items()
                try:
                    for item in source:
                        if not put((item, None)):
                            return
                finally:
                    close = getattr(source, "close", None)
                    if close is not None:
                        close()
        except BaseException as error:  # handed to the consumer, raised there
            put((None, error))
            return
        put((_END, None))

    producer = threading.Thread(target=produce, name="batch-producer", daemon=True)
    producer.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        producer.join()
