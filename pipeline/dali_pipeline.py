"""The DALI backend: one pipeline per orientation group, read as a line of stages.

`detection_pipeline` is the whole per-sample path: webdataset reader (this rank's range, seeded
shuffle) -> one coin per image -> decode ("mixed" on the GPU, "cpu" without one) -> flip the
image (flip), boxes and polygons (bb_flip, coord_flip), all with that coin -> resize (reference
sizes, integer maths shared with the torch fallback) -> ground truth padded to the manifest's
maxima. Images stay uint8 RGB: the model normalizes them on the device (pipeline/batch.py). Images are padded to their bucket in the one copy
out of DALI's buffers (`transforms.pad_images`), which costs no extra pass over the pixels.

`DaliLoader` runs one such pipeline per group, picks the group of each batch from the shared
epoch plan (pipeline/sampling.py) and turns DALI's outputs into a `Batch` on the device.
Pipelines are rebuilt every epoch with seeds derived from (seed, epoch, rank, group), so an
epoch depends only on those, and a mid-epoch position is saved with DALI's own checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from pipeline.batch import Batch
from pipeline.loader_base import LoaderBase
from pipeline.sampling import derive_seed, group_order, reader_shard
from pipeline.settings import LoaderSettings
from pipeline.shard_set import GroupShards, ShardReadError, ShardSet, shard_error
from pipeline.shard_format import GROUPS, ShardFormatError, decode_sample
from pipeline.torch_loader import find_damaged_sample
from pipeline.transforms import check_fits_bucket, pad_images, padded_shape, resized_size

READER_NAME = "reader"
COMPONENTS = ["jpg", "json", "boxes", "labels", "polys", "verts", "crc32"]
DTYPES = [types.UINT8, types.UINT8, types.FLOAT, types.INT32, types.INT32, types.FLOAT, types.UINT32]


def _as_float(*values: Any) -> Any:
    return fn.cast(fn.stack(*values), dtype=types.FLOAT)


@pipeline_def(enable_checkpointing=True)
def detection_pipeline(
    shards: GroupShards,
    shard_id: int,
    num_shards: int,
    settings: LoaderSettings,
    max_instances: int,
    max_polygons: int,
    max_vertices: int,
    decode_on_gpu: bool,
    output_on_gpu: bool,
):
    members = fn.readers.webdataset(
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
    jpegs, meta, boxes, labels, polys, verts, _ = members
    boxes = fn.reshape(boxes, shape=[-1, 4])
    polys = fn.reshape(polys, shape=[-1, 3])
    verts = fn.reshape(verts, shape=[-1, 2])

    # The one random draw per image: image, boxes and polygons are flipped by the same coin.
    coin = fn.random.coin_flip(probability=settings.flip_prob)

    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # [h, w, c], from the JPEG header
    height, width = shape[0], shape[1]
    new_h, new_w = resized_size(height, width, settings.min_size, settings.max_size)

    # Pixels, uint8 RGB throughout (the model normalizes on the device). COCO annotations refer
    # to the stored pixel grid, so EXIF orientation is ignored. Flipping before the resize
    # touches the small source image; padding happens in the one copy out of DALI.
    images = fn.decoders.image(
        jpegs, device="mixed" if decode_on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False
    )
    images = fn.flip(images, horizontal=coin)
    images = fn.resize(
        images,
        resize_x=fn.cast(new_w, dtype=types.FLOAT),
        resize_y=fn.cast(new_h, dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    if output_on_gpu and not decode_on_gpu:
        images = images.gpu()

    # Ground truth: flipped in relative coordinates (bb_flip/coord_flip map x -> 1 - x), then
    # scaled to the resized image, which is x -> W - x in pixels.
    boxes_rel = boxes / _as_float(width, height, width, height)
    verts_rel = verts / _as_float(width, height)
    boxes_rel = fn.bb_flip(boxes_rel, ltrb=True, horizontal=coin)
    verts_rel = fn.coord_flip(verts_rel, layout="xy", flip_x=coin)
    boxes = boxes_rel * _as_float(new_w, new_h, new_w, new_h)
    verts = verts_rel * _as_float(new_w, new_h)

    num_boxes = boxes.shape()[0]
    num_polys = polys.shape()[0]
    return (
        images,
        meta,
        fn.stack(height, width),
        fn.stack(new_h, new_w),
        coin,
        fn.pad(boxes, axes=(0,), shape=(max_instances,), fill_value=0.0),
        fn.pad(labels, axes=(0,), shape=(max_instances,), fill_value=0),
        num_boxes,
        fn.pad(verts, axes=(0,), shape=(max_vertices,), fill_value=0.0),
        fn.pad(polys, axes=(0,), shape=(max_polygons,), fill_value=-1),
        num_polys,
        *members,  # as read, on the CPU, for the per-sample check (`_check_samples`)
    )


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
        checkpoints = resume["checkpoints"] if resume is not None else {}
        self._pipes = {
            g: self._build(g, epoch, checkpoints.get(g)) for g in GROUPS if self.batches[g] > 0
        }
        for group in group_order(self.batches, self.seed, epoch)[start:]:
            with self.timer.measure("wait"):
                outputs = self._run(group)
            with self.timer.measure("collate"):
                batch = self._to_batch(outputs, group)
            yield batch

    def _build(self, group: str, epoch: int, checkpoint: str | None):
        shards = self.shard_set.groups[group]
        pipe = detection_pipeline(
            shards=shards,
            shard_id=reader_shard(self.rank, self.world_size, epoch, self.training),
            num_shards=self.world_size,
            settings=self.settings,
            max_instances=max(self.shard_set.max_instances, 1),
            max_polygons=max(self.shard_set.max_polygons, 1),
            max_vertices=max(self.shard_set.max_vertices, 1),
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
            raise _read_error(e, group, shards, self.shard_set.num_categories) from None
        return pipe

    def _run(self, group: str):
        try:
            return self._pipes[group].run()
        except RuntimeError as e:
            self._pipes.pop(group)  # a failed DALI pipeline cannot run again
            raise _read_error(e, group, self.shard_set.groups[group], self.shard_set.num_categories) from None

    def _to_batch(self, outputs, group: str) -> Batch:
        images, meta, original, resized, coin, boxes, labels, num_boxes, verts, polys, num_polys, *members = outputs
        try:
            _check_samples(members, self.shard_set.num_categories)
        except ShardReadError:
            self._pipes.clear()  # a damaged sample ends the epoch: stop DALI's threads now, not at garbage collection
            raise
        folder = self.shard_set.folder
        host = {
            "original": _dense(original, folder).int(),
            "resized": _dense(resized, folder).int(),
            "flipped": _dense(coin, folder).bool(),
            "boxes": _dense(boxes, folder),
            "labels": _dense(labels, folder).long(),
            "num_boxes": _dense(num_boxes, folder).int(),
            "verts": _dense(verts, folder),
            "polys": _dense(polys, folder),
            "num_polys": _dense(num_polys, folder).int(),
        }
        ids = torch.tensor([json.loads(np.asarray(meta[i]).tobytes())["image_id"] for i in range(len(meta))])
        bucket = None if self.settings.buckets is None else self.settings.buckets[group]
        if bucket is not None:
            check_fits_bucket(host["resized"], bucket, ids)
        shape = padded_shape(host["resized"], bucket, self.settings.size_divisibility)
        host["polys"][..., 1:].clamp_(min=0)  # padding rows are (-1, 0, 0)
        with self._on_copy_stream():
            # DLPack views of DALI's buffers (valid until the next run), copied once into the batch.
            batch = Batch(
                images=pad_images(
                    [torch.from_dlpack(images[i]) for i in range(len(images))], shape, self.device, self._buffers
                ),
                image_sizes=host["resized"],
                original_sizes=host["original"],
                scales=host["resized"].float() / host["original"].float(),
                flipped=host["flipped"],
                image_ids=ids.long(),
                boxes=host["boxes"],
                labels=host["labels"],
                num_boxes=host["num_boxes"],
                verts=host["verts"],
                polys=host["polys"].int(),
                num_polys=host["num_polys"],
            ).to(self.device, non_blocking=True)
        return self._hand_over(batch)


def _dense(tensor_list, folder: Path) -> torch.Tensor:
    """Copy a uniform-shape CPU TensorList into a new torch tensor (DALI reuses its buffers)."""
    if not tensor_list.is_dense_tensor():
        # fn.pad never crops: ground truth longer than the manifest's maxima leaves ragged shapes.
        raise ShardReadError(
            f"{folder}/manifest.json: a sample has more instances, polygons or vertices than max_instances/"
            f"max_polygons/max_vertices; re-run tools/shard_coco.py to rewrite the manifest"
        )
    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype])
    feed_ndarray(dense, out)
    return out


_SOURCE = re.compile(r"(\S+?\.tar):\d+:(\d+)\.\w+")


def _read_error(error: RuntimeError, group: str, shards: GroupShards, num_categories: int) -> ShardReadError:
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
        bad = find_damaged_sample(shards, num_categories)
        if bad is not None:
            return bad
    folder = shards.tars[0].parent
    return shard_error(folder, f"DALI failed while reading the {group} shards ({detail})")


def _check_samples(members: list, num_categories: int) -> None:
    """The shard format's per-sample check (shard_format.decode_sample) on the reader's outputs, as read.

    DALI hands each component over as a CPU buffer, so this costs the crc32s and a few array
    checks per image; a damaged sample stops the run in one sentence naming its shard and key.
    """
    for i in range(len(members[0])):
        tar, _, member = members[0][i].source_info().rpartition(":")  # "<tar>:<offset>:<key>.jpg"
        tar, key = tar.rpartition(":")[0], member.rpartition(".")[0]
        try:
            decode_sample({c: np.asarray(m[i]) for c, m in zip(COMPONENTS, members)}, key, num_categories)
        except ShardFormatError as e:
            raise shard_error(tar, str(e), key) from None
