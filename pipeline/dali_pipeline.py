"""The DALI backend: one pipeline per orientation group, read as a line of stages.

`detection_pipeline` is the whole per-sample path on the pixels: webdataset reader (this rank's
range, seeded shuffle) -> one coin per image -> decode ("mixed" on the GPU, "cpu" without one)
-> resize to the reference size (integer maths shared with the torch fallback), flipped by the
coin in the same pass (a mirrored region of interest: no separate flip over the pixels). Images
stay uint8 RGB: the model normalizes them on the device (pipeline/batch.py).

The ground truth leaves the graph as stored, with the coin and the sizes: `DaliLoader` scales,
flips and pads it per batch on the host with the code the torch fallback uses
(pipeline/collate.py), and pads the images in the one copy out of DALI's buffers. What was
measured against this (docs/PERFORMANCE.md): a separate `fn.flip`, `bb_flip`/`coord_flip` with
the DALI arithmetic around them, and `fn.pad` to the manifest's maxima cost CPU time per image
inside DALI's threads, for arrays the host handles in microseconds per batch.

`DaliLoader` runs one such pipeline per group, picks the group of each batch from the shared
epoch plan (pipeline/sampling.py) and turns DALI's outputs into a `Batch` on the device.
Pipelines are rebuilt every epoch with seeds derived from (seed, epoch, rank, group), so an
epoch depends only on those, and a mid-epoch position is saved with DALI's own checkpoints.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipeline.batch import Batch
from pipeline.collate import SampleRecord, make_batch
from pipeline.loader_base import LoaderBase
from pipeline.sampling import derive_seed, group_order, reader_shard
from pipeline.settings import LoaderSettings
from pipeline.shard_format import ARRAY_COMPONENTS, GROUPS, sample_key
from pipeline.shard_set import GroupShards, ShardReadError, ShardSet, shard_error
from pipeline.torch_loader import find_undecodable_jpeg
from pipeline.transforms import resized_size

READER_NAME = "reader"
COMPONENTS = ["jpg", "json", *ARRAY_COMPONENTS]
DTYPES = [types.UINT8, types.UINT8, types.FLOAT, types.INT32, types.INT32, types.FLOAT]


@pipeline_def(enable_checkpointing=True)
def detection_pipeline(
    shards: GroupShards,
    shard_id: int,
    num_shards: int,
    settings: LoaderSettings,
    decode_on_gpu: bool,
    output_on_gpu: bool,
):
    """Outputs: images (uint8 HWC, resized and flipped), json, coin, and boxes, labels, polys, verts as stored."""
    jpegs, meta, boxes, labels, polys, verts = fn.readers.webdataset(
        paths=[str(p) for p in shards.tars],
        index_paths=[str(p) for p in shards.indices],
        ext=COMPONENTS,
        dtypes=DTYPES,
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,  # the epoch plan moves ranks between ranges, one pipeline per epoch
        pad_last_batch=True,  # every rank yields the same number of batches (repeats its last sample)
        random_shuffle=settings.shuffle_buffer > 0,
        initial_fill=max(min(settings.shuffle_buffer, shards.samples), 1),  # no use buffering more than the data
        name=READER_NAME,
    )

    # The one random draw per image: the image here, its boxes and polygons on the host (collate.py).
    coin = fn.random.coin_flip(probability=settings.flip_prob)

    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # [h, w, c], from the JPEG header
    new_h, new_w = resized_size(shape[0], shape[1], settings.min_size, settings.max_size)

    # COCO annotations refer to the stored pixel grid, so EXIF orientation is ignored. The flip
    # is the resize's region of interest mirrored (x from 1 to 0, relative), one pass over the pixels.
    images = fn.decoders.image(
        jpegs, device="mixed" if decode_on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False
    )
    flip = fn.cast(coin, dtype=types.FLOAT)
    images = fn.resize(
        images,
        size=fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT),
        roi_start=fn.stack(flip * 0.0, flip),
        roi_end=fn.stack(flip * 0.0 + 1.0, 1.0 - flip),
        roi_relative=True,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    if output_on_gpu and not decode_on_gpu:
        images = images.gpu()
    return images, meta, coin, boxes, labels, polys, verts


class DaliLoader(LoaderBase):
    """Iterable over `Batch` for one rank; see pipeline/loader.py for the contract."""

    HIDDEN_STAGES = ("read", "decode", "augment")  # run inside DALI's threads

    def __init__(self, shard_set: ShardSet, settings: LoaderSettings, **placement: Any):
        """`placement`: the keywords of `LoaderBase` (training, batch_size, rank, world_size, seed, device)."""
        super().__init__(shard_set, settings, **placement)
        self._pipes: dict[str, Any] = {}

    def _backend_state(self) -> dict[str, Any]:
        """Each group pipeline's DALI checkpoint."""
        return {"checkpoints": {g: pipe.checkpoint() for g, pipe in self._pipes.items()}}

    def _epoch_batches(self, epoch: int, start: int, resume: dict[str, Any] | None) -> Iterator[Batch]:
        self._pipes = self.build_pipelines(epoch, resume["checkpoints"] if resume is not None else {})
        for group in group_order(self.batches, self.seed, epoch)[start:]:
            with self.timer.measure("wait"):
                outputs = self._run(group)
            with self.timer.measure("collate"):
                batch = self._to_batch(outputs, group)
            yield batch

    def build_pipelines(self, epoch: int, checkpoints: dict[str, str] | None = None) -> dict[str, Any]:
        """The built DALI pipeline of each non-empty group for `epoch`, from its checkpoint when given."""
        checkpoints = checkpoints or {}
        return {g: self._build(g, epoch, checkpoints.get(g)) for g in GROUPS if self.batches[g] > 0}

    def _build(self, group: str, epoch: int, checkpoint: str | None):
        shards = self.shard_set.groups[group]
        pipe = detection_pipeline(
            shards=shards,
            shard_id=reader_shard(self.rank, self.world_size, epoch, self.training),
            num_shards=self.world_size,
            settings=self.settings,
            decode_on_gpu=self.decode_on_device,
            output_on_gpu=self.device.type == "cuda",
            batch_size=self.batch_size,
            num_threads=self.settings.num_threads,
            device_id=self.device.index if self.device.type == "cuda" else None,
            seed=derive_seed(self.seed, epoch, self.rank, GROUPS.index(group)),
            prefetch_queue_depth=self.settings.prefetch,
            checkpoint=checkpoint,
        )
        try:
            pipe.build()
        except RuntimeError as e:
            raise _read_error(e, group, shards) from None
        return pipe

    def _run(self, group: str):
        try:
            return self._pipes[group].run()
        except RuntimeError as e:
            self._pipes.pop(group)  # a failed DALI pipeline cannot run again
            raise _read_error(e, group, self.shard_set.groups[group]) from None

    def _to_batch(self, outputs, group: str) -> Batch:
        images, meta, coin, *arrays = outputs
        records = [self._record(meta[i], coin[i], [a[i] for a in arrays]) for i in range(len(meta))]
        for record, image in zip(records, images):
            if tuple(image.shape()[:2]) != record.resized:
                raise shard_error(
                    record.source[0],
                    f"the JPEG resizes to {tuple(image.shape()[:2])} but its json's size {record.original} "
                    f"resizes to {record.resized}",
                    record.source[1],
                )
        with self._on_copy_stream():
            # DLPack views of DALI's buffers (valid until the next run), copied once into the batch.
            batch = make_batch(
                records,
                [torch.from_dlpack(images[i]) for i in range(len(images))],
                maxima=self.maxima,
                bucket=None if self.settings.buckets is None else self.settings.buckets[group],
                size_divisibility=self.settings.size_divisibility,
                device=self.device,
            ).to(self.device, non_blocking=True)
        return self._hand_over(batch, self._copies_done())

    def _record(self, meta, coin, arrays) -> SampleRecord:
        """One sample's host-side record from its json, coin and stored arrays (DALI tensors)."""
        info = json.loads(np.asarray(meta).tobytes())
        height, width = int(info["height"]), int(info["width"])
        stored = {
            name: np.asarray(array).reshape(-1, *row) for (name, (_, row)), array in zip(ARRAY_COMPONENTS.items(), arrays)
        }
        return SampleRecord(
            image_id=int(info["image_id"]),
            original=(height, width),
            resized=resized_size(height, width, self.settings.min_size, self.settings.max_size),
            flipped=bool(np.asarray(coin)),
            source=(meta.source_info().rsplit(":", 2)[0], sample_key(int(info["image_id"]))),
            **stored,
        )


_SOURCE = re.compile(r"(\S+?\.tar):\d+:(\d+)\.\w+")


def _read_error(error: RuntimeError, group: str, shards: GroupShards) -> ShardReadError:
    """One sentence from a DALI failure, naming the shard and sample key whenever they can be found."""
    text = str(error)
    lines = [
        line.strip()
        for line in text.split("encountered:", 1)[-1].splitlines()
        if line.strip() and "no longer valid" not in line and not line.strip().startswith("C++ context")
    ]
    detail = lines[0] if lines else "unknown DALI error"
    source = _SOURCE.search(text)
    if source:
        return shard_error(source.group(1), f"DALI could not read or decode this sample ({detail})", source.group(2))
    if "decoders.image" in text:
        # DALI did not say which sample: find it with the Python reader (only on this error path).
        bad = find_undecodable_jpeg(shards)
        if bad is not None:
            return shard_error(bad[0], f"the JPEG does not decode (DALI: {detail})", bad[1])
    folder = shards.tars[0].parent
    return shard_error(folder, f"DALI failed while reading the {group} shards ({detail})")
