"""The `Batch` every input pipeline yields on the training device, and the host code that makes one.

Coordinates: boxes and polygon vertices are continuous pixel coordinates (a pixel's left
edge is x, its centre x + 0.5) in the resized image, after the flip, transformed as the
reference transforms its own (maskrcnn-benchmark `BoxList`, `Polygons`; tests/reference/):
- resize: vertices x -> x sx; boxes are inclusive pixel boxes there (x2 = x + w - 1), scaled
  as such, so a continuous box becomes (x1 sx, y1 sy, (x2 - 1) sx + 1, (y2 - 1) sy + 1);
- horizontal flip (W the resized width, before padding): a box (x1, y1, x2, y2) becomes
  (W - x2, y1, W - x1, y2), its mirror image; polygon vertices x -> W - x - 1, one pixel left
  of the mirror image (the reference's `TO_REMOVE` applied to points).

Images are what the device needs and nothing more: uint8 RGB pixels, resized and flipped,
padded at the bottom and right with zeros. The model normalizes them on the device as the
first op of its static part (model/normalization.py: channel order, mean and std are a
property of the weights), and zeroes the padding after normalization, as the reference does.

Ground truth is padded per batch to one of a few fixed sizes (`padded_count`
below): for boxes/labels (G), polygons (P) and vertices (V) alike, the batch's largest
count rounded up to a power of two, at least 16, and at most the manifest's maximum (which no
sample exceeds: a longer one is an error, never cut). On COCO (at most 93 instances) that is
G = 16, 32, 64 or 93, where padding to the maximum made RPN matching and mask targets work on
93 slots for batches whose fullest image has a dozen objects. Both backends pad with the same
function, so their ground truth agrees exactly. Every shape is still static within a batch and
the model never needs the host (`num_boxes`, `num_polys` mark the real rows).

Making a batch (the step both backends share after reading a sample): `sample_record` keeps a
sample's ground truth as stored in the shard (source pixels, pipeline/shard_format.py), its id,
original and resized sizes and flip coin; the backend decodes (`decode_image` here, or DALI) and
resizes and flips the pixels (`transform_image` here, or DALI); `make_batch` then
- checks the counts against the manifest's maxima (more would be cut off: an error instead),
- pads boxes, labels, polygons and vertices per batch to `padded_count` slots,
- scales and flips them for the whole batch at once (above),
- copies the images into the padded uint8 batch (`pad_images`).
So the two backends' ground truth comes out of the same code and agrees exactly; only the
pixels come from different decoders and resize kernels.

Geometry: sizes follow the reference (maskrcnn-benchmark `Resize.get_size`): the shorter side becomes
`min_size` unless the longer side would then exceed `max_size`, in which case the shorter side
becomes `round(max_size * short / long)` (Python's round, half to even); the longer side is then
`int(short_new * long / short)` (truncated). Boxes and polygon vertices are scaled by the same
per-axis factors as the image (sx = new_w / w, sy = new_h / h), as the reference scales its
inclusive boxes and its polygons (above).

Padding: to a multiple of `size_divisibility` (dynamic shapes), or to a static bucket per
orientation. Bucket rule: the tight bucket of an orientation holds its largest resized image,
(ceil_d(min_size), ceil_d(max_size)) for landscape and the transpose for portrait. A configured
bucket is kept when it holds the tight bucket and is at most one `size_divisibility` step larger
in each dimension (the reference's 800x1344 / 1344x800 are exactly tight for 800/1333/32);
otherwise the tight bucket replaces it, so demo sizes such as 160/267 get 160x288 and 288x160
instead of images padded to 800x1344. A bucket listed twice, or smaller than the largest resized
image of both orientations (it could never be used), is refused when the config is built
(`pipeline.bucket_problem`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.shard_format import Sample, shard_error

MIN_SLOTS = 16  # the smallest ground-truth padding: batches with few instances share one shape
_UNTIMED = nullcontext()  # make_batch's `measure` when nobody times it (reusable: nothing allocated per part)

@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W] uint8 RGB, zero padded, channels_last memory format
    image_sizes: torch.Tensor  # [B, 2] int32 (h, w) after resize, before padding
    original_sizes: torch.Tensor  # [B, 2] int32 (h, w) of the source image
    scales: torch.Tensor  # [B, 2] float32 (sy, sx) = resized size / original size, per axis
    flipped: torch.Tensor  # [B] bool, whether the image and its ground truth were flipped
    image_ids: torch.Tensor  # [B] int64 COCO image ids
    boxes: torch.Tensor  # [B, G, 4] float32 xyxy; rows past num_boxes are zero
    labels: torch.Tensor  # [B, G] int64 contiguous 1..K; 0 past num_boxes
    num_boxes: torch.Tensor  # [B] int32
    verts: torch.Tensor  # [B, V, 2] float32 polygon vertices (x, y) of each image, zero padded
    polys: torch.Tensor  # [B, P, 3] int32 (instance, first vertex, end vertex) into verts[b]; padding (-1, 0, 0)
    num_polys: torch.Tensor  # [B] int32

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)
        }
        moved["images"] = moved["images"].contiguous(memory_format=torch.channels_last)
        return Batch(**moved)


# --- Geometry: sizes, flips, padding ---


def _select(condition: Any, if_true: Any, if_false: Any) -> Any:
    # Branch-free choice: works on Python ints, torch tensors and DALI graph nodes alike.
    return if_false + condition * (if_true - if_false)


def resized_size(height: Any, width: Any, min_size: int, max_size: int) -> tuple[Any, Any]:
    """(new_h, new_w) by the reference rule, in integer arithmetic only.

    Written branch-free with `//`, `*`, `+`, `-` and comparisons so the same function runs on
    Python ints (torch fallback) and on DALI integer nodes inside the pipeline graph; integer
    maths also makes both backends agree exactly, with no float rounding at the boundaries.
    """
    is_portrait = width < height
    short = _select(is_portrait, width, height)
    long = _select(is_portrait, height, width)
    # round(max_size * short / long) with ties to even, as Python's round in the reference.
    quotient = (max_size * short) // long
    twice_remainder = 2 * (max_size * short - quotient * long)
    odd = quotient - (quotient // 2) * 2
    round_up = (twice_remainder > long) | ((twice_remainder == long) & (odd == 1))
    capped = quotient + round_up
    target = _select(long * min_size > max_size * short, capped, min_size)
    new_long = (target * long) // short
    return _select(is_portrait, new_long, target), _select(is_portrait, target, new_long)


def round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def bucket_shapes(
    min_size: int, max_size: int, size_divisibility: int, configured: Sequence[Sequence[int]] = ()
) -> dict[str, tuple[int, int]]:
    """The padded (h, w) of each orientation group under static shapes (rule in the module doc)."""
    divisor = max(size_divisibility, 1)
    tight = {
        "landscape": (round_up(min_size, divisor), round_up(max_size, divisor)),
        "portrait": (round_up(max_size, divisor), round_up(min_size, divisor)),
    }
    buckets = {}
    for group, (tight_h, tight_w) in tight.items():
        fitting = [
            (int(h), int(w))
            for h, w in configured
            if tight_h <= h < tight_h + divisor and tight_w <= w < tight_w + divisor
        ]
        buckets[group] = fitting[0] if fitting else (tight_h, tight_w)
    return buckets


def padded_shape(
    image_sizes: torch.Tensor, bucket: tuple[int, int] | None, size_divisibility: int
) -> tuple[int, int]:
    """The batch's padded (H, W): the static bucket, or the largest image rounded up to the divisor."""
    if bucket is not None:
        return bucket
    divisor = max(size_divisibility, 1)
    return round_up(int(image_sizes[:, 0].max()), divisor), round_up(int(image_sizes[:, 1].max()), divisor)


def pad_images(images: Sequence[torch.Tensor], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """uint8 [h, w, 3] images -> uint8 [B, 3, H, W] channels_last, content top-left, zeros elsewhere.

    Written into an NHWC buffer viewed as NCHW, which is exactly the channels_last layout; this
    copy is also the one out of the producer's buffers, so padding costs no extra pass.
    """
    size = (len(images), *shape, 3)
    if device.type != "cpu":
        out = torch.empty(size, dtype=torch.uint8, device=device)
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            out[i, :h, :w] = image
            out[i, h:] = 0
            out[i, :h, w:] = 0
        return out.permute(0, 3, 1, 2)
    # A fresh buffer from numpy, which asks the kernel for huge pages for large arrays: filling it
    # then costs what refilling a reused one does (0.8 ms per 800x1344 image here), where a
    # torch.empty buffer pays about 0.7 ms more in page faults. numpy's single-threaded copy also
    # leaves the cores to the pipeline's threads (torch's OpenMP copy stalls at its barriers).
    target = np.empty(size, dtype=np.uint8)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        np.copyto(target[i, :h, :w], image.numpy())
        target[i, h:] = 0
        target[i, :h, w:] = 0
    return torch.from_numpy(target).permute(0, 3, 1, 2)


def check_fits_bucket(image_sizes: torch.Tensor, bucket: tuple[int, int], image_ids: torch.Tensor) -> None:
    """Padding must never crop: extreme aspect ratios (past ~30:1) can exceed max_size by rounding."""
    too_big = (image_sizes[:, 0] > bucket[0]) | (image_sizes[:, 1] > bucket[1])
    if bool(too_big.any()):
        i = int(too_big.nonzero()[0])
        raise ValueError(
            f"image {int(image_ids[i])} resizes to {tuple(image_sizes[i].tolist())}, larger than the static bucket "
            f"{bucket}; set data.static_shapes=false or larger data.buckets"
        )


def flip_boxes(boxes: torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """x -> W - x on both edges, so (x1, y1, x2, y2) becomes (W - x2, y1, W - x1, y2).

    Boxes are [..., 4]; `width` is a number or a tensor that broadcasts against boxes[..., 0].
    The reference's flip of its inclusive boxes (x -> W - x - 1 on x1 and its x2) is this one.
    """
    return torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], dim=-1)


def flip_vertices(verts: torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """x -> W - x - 1, the reference's `Polygons.transpose`; vertices are [..., 2] (x, y), `width`
    broadcasts against verts[..., 0]. In the order of its float32 operations: (W - x) - 1."""
    return torch.stack([width - verts[..., 0] - 1, verts[..., 1]], dim=-1)


def resize_boxes(boxes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Continuous boxes [B, N, 4] scaled by (sy, sx) `scales` [B, 2] as the reference scales its inclusive boxes."""
    sx, sy = scales[:, None, 1], scales[:, None, 0]
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1 * sx, y1 * sy, (x2 - 1) * sx + 1, (y2 - 1) * sy + 1], dim=-1)


def transform_image(image: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """uint8 [3, h, w] RGB -> uint8 [H, W, 3] RGB resized (bilinear, antialiased) and flipped.

    The result is HWC (a view), the layout `pad_images` takes from both backends.
    """
    if flip:
        image = TF.horizontal_flip(image)
    image = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return image.permute(1, 2, 0)

def decode_image(jpeg: torch.Tensor, source: tuple[str | Path, str], device: torch.device) -> torch.Tensor:
    """uint8 [3, h, w] RGB from a sample's JPEG bytes (uint8 [n]); raises ShardReadError naming `source` (tar, key).

    COCO annotations refer to the stored pixel grid, so EXIF orientation is ignored (as in DALI).
    """
    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        tar, key = source
        raise shard_error(tar, f"the JPEG does not decode ({e})", key) from None


# --- Records -> Batch ---


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
    measure: Callable[[str], AbstractContextManager] = lambda op: _UNTIMED,
) -> Batch:
    """The batch of `records` and their images (uint8 [h, w, 3], on `device` or the CPU), ground truth on the CPU.

    `maxima`: (instances, polygons, vertices) per image from the manifest, at least 1 each.
    `measure(op)` times the `ground_truth` and `pad_images` parts (the loaders' `StageTimer.measure`).
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
    with measure("ground_truth"):
        ground_truth = _padded_ground_truth(records, maxima, resized, original, flipped)
    with measure("pad_images"):
        padded = pad_images(images, shape, device)
    return Batch(
        images=padded, image_sizes=resized, original_sizes=original, flipped=flipped, image_ids=image_ids, **ground_truth
    )


def _padded_ground_truth(
    records: Sequence[SampleRecord], maxima: tuple[int, int, int], resized: torch.Tensor, original: torch.Tensor,
    flipped: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The `Batch` fields of the ground truth: padded per batch, scaled to the resized images and flipped."""
    max_instances, max_polygons, max_vertices = maxima
    num_boxes = torch.tensor([len(r.labels) for r in records], dtype=torch.int32)
    num_polys = torch.tensor([len(r.polys) for r in records], dtype=torch.int32)
    num_verts = torch.tensor([len(r.verts) for r in records], dtype=torch.int32)
    boxes = _padded([r.boxes for r in records], padded_count(int(num_boxes.max()), max_instances), 0)
    labels = _padded([r.labels for r in records], boxes.shape[1], 0)
    polys = _padded([r.polys for r in records], padded_count(int(num_polys.max()), max_polygons), 0)
    verts = _padded([r.verts for r in records], padded_count(int(num_verts.max()), max_vertices), 0)
    polys[..., 0][torch.arange(polys.shape[1]) >= num_polys[:, None]] = -1  # padding rows are (-1, 0, 0)

    # Scale (sy, sx) and flip on the whole batch; padding rows stay zero.
    scales = (resized.double() / original.double()).float()  # the reference's Python-float ratios, applied in float32
    width = resized[:, 1].float()
    box_rows = torch.arange(boxes.shape[1]) < num_boxes[:, None]
    vert_rows = torch.arange(verts.shape[1]) < num_verts[:, None]
    boxes = torch.where(box_rows[..., None], resize_boxes(boxes, scales), boxes)
    verts = verts * scales[:, None, [1, 0]]
    boxes = torch.where((flipped[:, None] & box_rows)[..., None], flip_boxes(boxes, width[:, None]), boxes)
    verts = torch.where((flipped[:, None] & vert_rows)[..., None], flip_vertices(verts, width[:, None]), verts)
    return dict(
        scales=scales, boxes=boxes, labels=labels.long(), num_boxes=num_boxes, verts=verts, polys=polys, num_polys=num_polys
    )


def _padded(arrays: Sequence[np.ndarray], rows: int, fill: int) -> torch.Tensor:
    """[B, rows, ...] from arrays of at most `rows` rows each, padded with `fill`."""
    out = np.full((len(arrays), rows, *arrays[0].shape[1:]), fill, dtype=arrays[0].dtype)
    for i, array in enumerate(arrays):
        out[i, : len(array)] = array
    return torch.from_numpy(out)
