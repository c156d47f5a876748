"""The `Batch` contract: what every input pipeline yields on the training device.

Coordinates: boxes and polygon vertices are continuous pixel coordinates (a pixel's left
edge is x, its centre x + 0.5) in the resized image, after the flip. A horizontal flip maps
x -> W - x for both (W is the resized image width, before padding), so a box (x1, y1, x2, y2)
becomes (W - x2, y1, W - x1, y2) and stays the extent of its flipped polygons.

Images are what the device needs and nothing more: uint8 RGB pixels, resized and flipped,
padded at the bottom and right with zeros. The model normalizes them on the device as the
first op of its static part (model/normalization.py: channel order, mean and std are a
property of the weights), and zeroes the padding after normalization, as the reference does.

Ground truth is padded per batch to one of a few fixed sizes (pipeline/collate.py
`padded_count`): for boxes/labels (G), polygons (P) and vertices (V) alike, the batch's largest
count rounded up to a power of two, at least 16, and at most the manifest's maximum (which no
sample exceeds: a longer one is an error, never cut). On COCO (at most 93 instances) that is
G = 16, 32, 64 or 93, where padding to the maximum made RPN matching and mask targets work on
93 slots for batches whose fullest image has a dozen objects. Both backends pad with the same
function, so their ground truth agrees exactly. Every shape is still static within a batch and
the model never needs the host (`num_boxes`, `num_polys` mark the real rows).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


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
