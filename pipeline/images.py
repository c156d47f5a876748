"""Plain decoded images -> a `Batch`, through the same resize and padding code as the loaders.

For running a trained model on images that are not in shards (tools/predict.py): each image is
resized by the reference rule (`resized_size`, `transform_image`, never flipped) and the batch is
padded as the eval loader pads it (`padded_shape`, `pad_images`): to the orientation's static
bucket when every image is of that orientation and fits it, else to a multiple of
`size_divisibility`. So a model sees exactly the input it sees in evaluation. The ground-truth
fields are empty (zero instances per image); in eval mode the model never reads them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pipeline.batch import Batch, pad_images, padded_shape, resized_size, transform_image
from pipeline.loader import LoaderSettings
from pipeline.shard_format import GROUPS, orientation


def batch_from_images(
    images: Sequence[torch.Tensor], settings: LoaderSettings, device: torch.device, image_ids: Sequence[int] | None = None
) -> Batch:
    """uint8 RGB images [3, h, w] of any sizes -> a Batch on `device` (ids 0..B-1 unless given)."""
    originals = [tuple(image.shape[1:]) for image in images]
    sizes = [resized_size(h, w, settings.min_size, settings.max_size) for h, w in originals]
    resized = [transform_image(image.to(device), size, flip=False) for image, size in zip(images, sizes)]
    image_sizes = torch.tensor(sizes, dtype=torch.int32)
    shape = padded_shape(image_sizes, _bucket(sizes, settings), settings.size_divisibility)
    ids = torch.tensor(list(image_ids) if image_ids is not None else range(len(images)), dtype=torch.int64)
    return unlabelled_batch(
        pad_images(resized, shape, device), image_sizes.to(device), torch.tensor(originals, dtype=torch.int32).to(device),
        ids.to(device),
    )


def unlabelled_batch(
    images: torch.Tensor, image_sizes: torch.Tensor, original_sizes: torch.Tensor, image_ids: torch.Tensor | None = None
) -> Batch:
    """Padded images [B, 3, H, W] with their resized and original sizes [B, 2] as a Batch without ground
    truth (zero instances per image), never flipped; image ids 0..B-1 unless given."""
    b, device = images.shape[0], images.device
    empty = dict(dtype=torch.float32, device=device)
    counts = dict(dtype=torch.int32, device=device)
    return Batch(
        images=images,
        image_sizes=image_sizes,
        original_sizes=original_sizes,
        scales=image_sizes.float() / original_sizes.float(),
        flipped=torch.zeros(b, dtype=torch.bool, device=device),
        image_ids=image_ids if image_ids is not None else torch.arange(b, device=device),
        boxes=torch.zeros(b, 0, 4, **empty),
        labels=torch.zeros(b, 0, dtype=torch.int64, device=device),
        num_boxes=torch.zeros(b, **counts),
        verts=torch.zeros(b, 0, 2, **empty),
        polys=torch.zeros(b, 0, 3, dtype=torch.int32, device=device),
        num_polys=torch.zeros(b, **counts),
    )


def _bucket(sizes: Sequence[tuple[int, int]], settings: LoaderSettings) -> tuple[int, int] | None:
    """The static bucket the eval loader would pad these resized sizes to, if they share one."""
    if settings.buckets is None:
        return None
    groups = {orientation(h, w) for h, w in sizes}
    if len(groups) != 1:
        return None
    bucket = settings.buckets[groups.pop()]
    return bucket if all(h <= bucket[0] and w <= bucket[1] for h, w in sizes) else None


def orientation_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices of images (original sizes (h, w)) in batches of one orientation each, as the loaders batch them."""
    batches: list[list[int]] = []
    for group in GROUPS:
        members = [i for i, (h, w) in enumerate(sizes) if orientation(h, w) == group]
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return batches
