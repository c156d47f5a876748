"""The DALI backend: one pipeline that decodes and resizes what the epoch plan feeds it.

`detection_pipeline` is the per-sample work on the pixels: JPEG bytes, each with its reference
size and its flip coin, from an external source -> decode ("mixed" on the GPU, "cpu" without
one) -> resize to that size, mirrored by the coin in the same pass (a region of interest from
x = 1 to x = 0: no separate flip over the pixels). Images stay uint8 RGB: the model normalizes
them on the device (pipeline/batch.py).

What to feed is the epoch plan both backends share (pipeline/epoch_plan.py): which samples this
rank reads, in which order, with which coin, and the group (orientation) of every batch. The
samples are read by random access (pipeline/shard_format.py) on the Python side, where their
ground truth stays: `DaliLoader` scales, flips and pads it per batch with the code the torch
fallback uses (pipeline/batch.py), and pads the images in the one copy out of DALI's buffers.
So both backends yield the same samples with the same coins; one pipeline serves both
orientation groups; a mid-epoch resume replays the plan from the saved position, with no DALI
checkpoint; and the reference sizes are Python integers, not DALI arithmetic.

Measured against the graph this replaced (docs/PERFORMANCE.md): a webdataset reader per group
(two pipelines cost about 6% more CPU than one doing the same work), `peek_image_shape` and
the size arithmetic, `fn.flip`, `bb_flip`/`coord_flip` and `fn.pad` to the manifest's maxima.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipeline.batch import Batch, SampleRecord, decode_image
from pipeline.loader import LoaderBase, LoaderSettings, StageTimer, read_record
from pipeline.shard_format import SampleRef, ShardReadError, ShardSet, sample_refs, shard_error


@pipeline_def
def detection_pipeline(source: Any, decode_on_gpu: bool, output_on_gpu: bool):
    """`source()` -> one batch as (JPEG bytes, resize ROI (y0, x0, y1, x1) relative, (h, w) size); yields the images (uint8 HWC)."""
    jpegs, roi, size = fn.external_source(
        source=source, num_outputs=3, batch=True, dtype=[types.UINT8, types.FLOAT, types.FLOAT]
    )
    # COCO annotations refer to the stored pixel grid, so EXIF orientation is ignored.
    images = fn.decoders.image(
        jpegs, device="mixed" if decode_on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False
    )
    images = fn.resize(
        images,
        size=size,
        roi_start=roi[0:2],
        roi_end=roi[2:4],
        roi_relative=True,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    if output_on_gpu and not decode_on_gpu:
        images = images.gpu()
    return images


class PlanFeeder:
    """The pipeline's external source: reads the plan's next batch and remembers its records.

    DALI calls it up to `prefetch` batches ahead of the outputs; `fed` holds the records (and
    JPEG bytes) of every batch fed but not yet taken, oldest first, which is the order DALI
    returns them in.
    """

    def __init__(self, plan: list[list[tuple[str, int, bool]]], refs: dict[str, Sequence[SampleRef]],
                 settings: LoaderSettings, timer: StageTimer):
        self._batches = iter(plan)
        self.refs = refs
        self.settings = settings
        self.timer = timer
        self.fed: deque[list[tuple[SampleRecord, np.ndarray]]] = deque()
        self.fed_ns: deque[int] = deque()  # when each batch in `fed` was handed to DALI (perf_counter_ns)

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        entries = next(self._batches)  # StopIteration past the plan's end: DALI's end of data
        with self.timer.measure("feed"):
            samples = [self._sample(group, position, flip) for group, position, flip in entries]
        self.fed.append(samples)
        self.fed_ns.append(time.perf_counter_ns())
        rois = [np.array([0, 1, 1, 0] if r.flipped else [0, 0, 1, 1], np.float32) for r, _ in samples]
        sizes = [np.array(r.resized, np.float32) for r, _ in samples]
        return [jpeg for _, jpeg in samples], rois, sizes

    def take(self) -> tuple[list[tuple[SampleRecord, np.ndarray]], int]:
        """The oldest batch fed and not taken yet (DALI returns them in that order), and when it was fed."""
        return self.fed.popleft(), self.fed_ns.popleft()

    def _sample(self, group: str, position: int, flip: bool) -> tuple[SampleRecord, np.ndarray]:
        with self.timer.measure("sample"):
            record, jpeg = read_record(self.refs[group][position], flip, self.settings, self.timer)
        return record, np.frombuffer(jpeg, dtype=np.uint8)


class DaliLoader(LoaderBase):
    """Iterable over `Batch` for one rank; see pipeline/loader.py for the contract."""

    HIDDEN_STAGES = ("decode", "augment")  # run inside DALI's threads

    def __init__(self, shard_set: ShardSet, settings: LoaderSettings, **placement: Any):
        """`placement`: the keywords of `LoaderBase` (training, batch_size, rank, world_size, seed, device)."""
        super().__init__(shard_set, settings, **placement)
        self.refs = sample_refs(shard_set)

    def epoch_pipeline(self, epoch: int, start: int = 0) -> tuple[Any, PlanFeeder, list[str]]:
        """The built pipeline fed with `epoch`'s plan from batch `start`, its feeder, and each batch's group."""
        plan = self._plan(epoch)[start:]
        feeder = PlanFeeder(plan, self.refs, self.settings, self.timer)
        pipe = detection_pipeline(
            source=feeder,
            decode_on_gpu=self.decode_on_device,
            output_on_gpu=self.device.type == "cuda",
            batch_size=self.batch_size,
            num_threads=self.settings.dali_threads,
            device_id=self.device.index if self.device.type == "cuda" else None,
            prefetch_queue_depth=self.settings.prefetch,
        )
        pipe.build()
        return pipe, feeder, [entries[0][0] for entries in plan]

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """The epoch's plan from batch `start` on: a resume replays the plan, reading nothing before `start`."""
        if start >= len(self):
            return
        pipe, feeder, groups = self.epoch_pipeline(epoch, start)
        for group in groups:
            with self.timer.measure("wait"):
                images = _run(pipe, feeder)
            samples, fed_ns = feeder.take()
            if self.timer.tracing:  # the batch inside DALI: from its feed to its outputs (decode, resize, flip)
                self.timer.record_flight("dali_graph", fed_ns, time.perf_counter_ns())
            yield self._to_batch(images, [record for record, _ in samples], group)

    def _to_batch(self, images, records: list[SampleRecord], group: str) -> Batch:
        """The copy out of DALI's buffers (`pad_images`, inside `collate`) and the ground truth's copy to the device."""
        with self._on_copy_stream():
            # DLPack views of DALI's buffers (valid until the next run), copied once into the batch.
            batch, copies_done = self._collate(records, [torch.from_dlpack(images[i]) for i in range(len(images))], group)
        if copies_done is not None:
            # DALI reuses its output buffers once run() is called again, on its own stream, which
            # nothing orders after this copy: the copy out must be over before then (a
            # device-to-device copy of the batch, on a stream that holds nothing else).
            copies_done.synchronize()
        return self._hand_over(batch, copies_done)


def _run(pipe: Any, feeder: PlanFeeder):
    """The next batch's images; a DALI failure becomes one sentence naming the sample when it can be found."""
    try:
        (images,) = pipe.run()
    except RuntimeError as error:
        raise _failed_sample(feeder) from error
    return images


def _failed_sample(feeder: PlanFeeder) -> ShardReadError:
    """The error to report after DALI failed on one of the batches fed but not yet taken.

    DALI's message says neither which sample failed nor in a stable form why, so the fed JPEGs
    are decoded again here (only on this error path): the first that does not decode is named.
    """
    for samples in feeder.fed:
        for record, jpeg in samples:
            try:
                decode_image(torch.from_numpy(jpeg.copy()), record.source, torch.device("cpu"))
            except ShardReadError as error:
                return error
    if not feeder.fed:
        return ShardReadError("DALI failed before a batch was fed (its error is this one's cause)")
    tar, key = feeder.fed[0][0][0].source
    return shard_error(
        tar, "DALI failed on a batch starting with this sample although its JPEGs decode (its error is this one's cause)", key
    )
