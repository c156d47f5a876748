"""A synthetic `Batch` for tests, benchmarks, warm-up and dry runs: random boxes holding polygons."""

from __future__ import annotations

import math

import torch

from pipeline.batch import Batch

VERTS_PER_POLYGON = 12


def synthetic_batch(
    batch_size: int,
    image_size: tuple[int, int],
    num_classes: int,
    max_gt: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    gt_per_image: int | None = None,
) -> Batch:
    """uint8 images of noise with `max_gt` padded ground-truth slots per image, 1..max_gt of them
    real (random), or `gt_per_image` of them in every image.

    Each instance is one star-shaped polygon (VERTS_PER_POLYGON vertices) inscribed in its box,
    so boxes are the polygons' extents as in real data; objects are drawn brighter than the
    background so a model can learn something from them.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    num_boxes = torch.randint(1, max_gt + 1, (batch_size,), generator=g, dtype=torch.int32)
    if gt_per_image is not None:
        num_boxes = torch.full_like(num_boxes, gt_per_image)
    sizes = torch.rand(batch_size, max_gt, 2, generator=g) * 0.4 + 0.1  # fraction of the image
    wh = sizes * torch.tensor([w, h])
    xy = torch.rand(batch_size, max_gt, 2, generator=g) * (torch.tensor([w, h]) - wh)
    boxes = torch.cat([xy, xy + wh], dim=-1)
    angles = torch.arange(VERTS_PER_POLYGON) * (2 * math.pi / VERTS_PER_POLYGON)
    radius = 0.6 + 0.4 * torch.rand(batch_size, max_gt, VERTS_PER_POLYGON, generator=g)
    unit = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1) * radius[..., None]  # [-1, 1]
    lo, hi = unit.amin(dim=2, keepdim=True), unit.amax(dim=2, keepdim=True)
    verts = xy[:, :, None] + (unit - lo) / (hi - lo) * wh[:, :, None]  # spans its box exactly
    real = torch.arange(max_gt)[None, :] < num_boxes[:, None]
    boxes = boxes * real[..., None]
    labels = torch.randint(1, num_classes, (batch_size, max_gt), generator=g) * real
    first = torch.arange(max_gt, dtype=torch.int32) * VERTS_PER_POLYGON
    polys = torch.stack([torch.arange(max_gt, dtype=torch.int32), first, first + VERTS_PER_POLYGON], dim=-1)
    polys = torch.where(real[..., None], polys.expand(batch_size, -1, -1), torch.tensor([-1, 0, 0], dtype=torch.int32))
    verts = (verts * real[..., None, None]).reshape(batch_size, -1, 2)

    images = torch.randn(batch_size, 3, h, w, generator=g) * 16 + 96
    for b in range(batch_size):
        for i in range(int(num_boxes[b])):
            x1, y1, x2, y2 = boxes[b, i].round().int().tolist()
            images[b, :, y1:y2, x1:x2] += 32 + 96 * labels[b, i].item() / num_classes
    return Batch(
        images=images.round().clamp(0, 255).to(torch.uint8),
        image_sizes=torch.tensor([[h, w]] * batch_size, dtype=torch.int32),
        original_sizes=torch.tensor([[h, w]] * batch_size, dtype=torch.int32),
        scales=torch.ones(batch_size, 2),
        flipped=torch.zeros(batch_size, dtype=torch.bool),
        image_ids=torch.arange(batch_size, dtype=torch.int64),
        boxes=boxes.float(),
        labels=labels.long(),
        num_boxes=num_boxes,
        verts=verts.float(),
        polys=polys,
        num_polys=num_boxes.clone(),
    ).to(device)
