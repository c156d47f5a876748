"""One `Batch` from per-sample records, on the host: the step both backends share after the pixels.

Each backend hands over, per sample, the ground truth as stored in the shard (source pixels,
pipeline/shard_format.py), the image id, the original and resized sizes and the flip coin, plus
the image already resized and flipped (uint8 [h, w, 3]). `make_batch` then
- checks the counts against the manifest's maxima (more would be cut off: an error instead),
- pads boxes, labels, polygons and vertices per batch to `padded_count` slots (pipeline/batch.py),
- scales and flips them for the whole batch at once (pipeline/transforms.py: x -> W - x),
- copies the images into the padded uint8 batch (`transforms.pad_images`).
So the two backends' ground truth comes out of the same code and agrees exactly; only the
pixels come from different decoders and resize kernels.

Both backends read every sample through `pipeline/sample_reader.read_sample` (on the host,
JPEG bytes and arrays together, before any decode): that is the one place for a per-sample check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.shard_format import Sample
from pipeline.shard_set import shard_error
from pipeline.transforms import check_fits_bucket, flip_boxes, flip_vertices, pad_images, padded_shape, resized_size

MIN_SLOTS = 16  # the smallest ground-truth padding: batches with few instances share one shape


@dataclass
class SampleRecord:
    """One sample between its backend and `make_batch`; arrays are in source pixel coordinates."""

    image_id: int
    original: tuple[int, int]  # (h, w) of the source image
    resized: tuple[int, int]  # (h, w) after the reference resize
    flipped: bool
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int32 [N]
    polys: np.ndarray  # int32 [P, 3]
    verts: np.ndarray  # float32 [V, 2]
    source: tuple[str | Path, str]  # (tar, sample key), for error messages


def sample_record(sample: Sample, tar: str | Path, flipped: bool, min_size: int, max_size: int) -> SampleRecord:
    """The record of a sample read from `tar`, with its coin and its reference resize."""
    return SampleRecord(
        image_id=sample.image_id,
        original=(sample.height, sample.width),
        resized=resized_size(sample.height, sample.width, min_size, max_size),
        flipped=flipped,
        boxes=sample.boxes,
        labels=sample.labels,
        polys=sample.polys,
        verts=sample.verts,
        source=(tar, sample.key),
    )


def padded_count(count: int, cap: int) -> int:
    """Slots for a batch whose fullest image has `count` rows: the next power of two, at least
    MIN_SLOTS, at most `cap` (the manifest's maximum), so a data set yields a handful of shapes."""
    slots = max(MIN_SLOTS, 1 << max(count - 1, 0).bit_length())
    return min(slots, cap)


def make_batch(
    records: Sequence[SampleRecord],
    images: Sequence[torch.Tensor],
    *,
    maxima: tuple[int, int, int],
    bucket: tuple[int, int] | None,
    size_divisibility: int,
    device: torch.device,
) -> Batch:
    """The batch of `records` and their images (uint8 [h, w, 3], on `device` or the CPU), ground truth on the CPU.

    `maxima`: (instances, polygons, vertices) per image from the manifest, at least 1 each.
    Raises ShardReadError for a sample past the maxima, ValueError for an image past the bucket.
    """
    max_instances, max_polygons, max_vertices = maxima
    for r in records:
        if len(r.labels) > max_instances or len(r.polys) > max_polygons or len(r.verts) > max_vertices:
            raise shard_error(
                r.source[0],
                f"the sample has {len(r.labels)} instances, {len(r.polys)} polygons and {len(r.verts)} vertices, more "
                f"than manifest.json's max_instances/max_polygons/max_vertices ({max_instances}/{max_polygons}/{max_vertices})",
                r.source[1],
            )
    original = torch.tensor([r.original for r in records], dtype=torch.int32)
    resized = torch.tensor([r.resized for r in records], dtype=torch.int32)
    image_ids = torch.tensor([r.image_id for r in records], dtype=torch.int64)
    flipped = torch.tensor([r.flipped for r in records], dtype=torch.bool)
    if bucket is not None:
        check_fits_bucket(resized, bucket, image_ids)
    shape = padded_shape(resized, bucket, size_divisibility)

    num_boxes = torch.tensor([len(r.labels) for r in records], dtype=torch.int32)
    num_polys = torch.tensor([len(r.polys) for r in records], dtype=torch.int32)
    num_verts = torch.tensor([len(r.verts) for r in records], dtype=torch.int32)
    boxes = _padded([r.boxes for r in records], padded_count(int(num_boxes.max()), max_instances), 0)
    labels = _padded([r.labels for r in records], boxes.shape[1], 0)
    polys = _padded([r.polys for r in records], padded_count(int(num_polys.max()), max_polygons), 0)
    verts = _padded([r.verts for r in records], padded_count(int(num_verts.max()), max_vertices), 0)
    polys[..., 0][torch.arange(polys.shape[1]) >= num_polys[:, None]] = -1  # padding rows are (-1, 0, 0)

    # Scale (sy, sx) and flip on the whole batch; padding rows stay zero.
    scales = resized.float() / original.float()
    width = resized[:, 1].float()
    box_rows = torch.arange(boxes.shape[1]) < num_boxes[:, None]
    vert_rows = torch.arange(verts.shape[1]) < num_verts[:, None]
    boxes = boxes * scales[:, None, [1, 0, 1, 0]]
    verts = verts * scales[:, None, [1, 0]]
    boxes = torch.where((flipped[:, None] & box_rows)[..., None], flip_boxes(boxes, width[:, None]), boxes)
    verts = torch.where((flipped[:, None] & vert_rows)[..., None], flip_vertices(verts, width[:, None]), verts)
    return Batch(
        images=pad_images(images, shape, device),
        image_sizes=resized,
        original_sizes=original,
        scales=scales,
        flipped=flipped,
        image_ids=image_ids,
        boxes=boxes,
        labels=labels.long(),
        num_boxes=num_boxes,
        verts=verts,
        polys=polys,
        num_polys=num_polys,
    )


def _padded(arrays: Sequence[np.ndarray], rows: int, fill: int) -> torch.Tensor:
    """[B, rows, ...] from arrays of at most `rows` rows each, padded with `fill`."""
    out = np.full((len(arrays), rows, *arrays[0].shape[1:]), fill, dtype=arrays[0].dtype)
    for i, array in enumerate(arrays):
        out[i, : len(array)] = array
    return torch.from_numpy(out)
