"""Geometry shared by the DALI pipeline and the torch fallback: sizes, flips, padding.

Sizes follow the reference (maskrcnn-benchmark `Resize.get_size`): the shorter side becomes
`min_size` unless the longer side would then exceed `max_size`, in which case the shorter side
becomes `round(max_size * short / long)` (Python's round, half to even); the longer side is then
`int(short_new * long / short)` (truncated). Boxes and polygon vertices are scaled by the same
per-axis factors as the image (sx = new_w / w, sy = new_h / h), and a horizontal flip maps
x -> W - x on continuous coordinates (pipeline/batch.py).

Padding: to a multiple of `size_divisibility` (dynamic shapes), or to a static bucket per
orientation. Bucket rule: the tight bucket of an orientation holds its largest resized image,
(ceil_d(min_size), ceil_d(max_size)) for landscape and the transpose for portrait. A configured
bucket is kept when it holds the tight bucket and is at most one `size_divisibility` step larger
in each dimension (the reference's 800x1344 / 1344x800 are exactly tight for 800/1333/32);
otherwise the tight bucket replaces it, so demo sizes such as 160/267 get 160x288 and 288x160
instead of images padded to 800x1344.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF


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
    """
    return torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], dim=-1)


def flip_vertices(verts: torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """x -> W - x; vertices are [..., 2] (x, y), `width` broadcasts against verts[..., 0]."""
    return torch.stack([width - verts[..., 0], verts[..., 1]], dim=-1)


def transform_image(image: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """uint8 [3, h, w] RGB -> uint8 [H, W, 3] RGB resized (bilinear, antialiased) and flipped.

    The result is HWC (a view), the layout `pad_images` takes from both backends.
    """
    if flip:
        image = TF.horizontal_flip(image)
    image = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return image.permute(1, 2, 0)
