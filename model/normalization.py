"""The model's input convention: uint8 RGB images in, normalized float images out.

Input pipelines hand over what the device needs and nothing more (pipeline/batch.py): uint8
RGB pixels, zero-padded. Which colour order, mean and std a network expects is a property of
its weights, so it lives here, with the model (`model.normalization`), and runs as the first
op of the static part: on a GPU one fused elementwise pass, inside the CUDA graph.

The result equals the reference's input (maskrcnn-benchmark: `to_bgr255`, `Normalize`, then
`to_image_list` zero-pads the normalized images): padding is zero after normalization.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.choices import NORMALIZATIONS, Normalization


def normalization(name: str) -> Normalization:
    if name not in NORMALIZATIONS:
        raise ValueError(f"model.normalization must be one of {sorted(NORMALIZATIONS)}, got {name!r}")
    return NORMALIZATIONS[name]


class InputNormalization(nn.Module):
    """uint8 RGB [B, 3, H, W] padded images -> float32 normalized, zero outside each image's (h, w)."""

    def __init__(self, norm: Normalization):
        super().__init__()
        self.reverse_channels = norm.channel_order == "BGR"
        # Buffers, so they follow the model to its device; not saved (they come from the config).
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        rows = torch.arange(height, device=images.device)[None, :, None] < image_sizes[:, 0, None, None]
        columns = torch.arange(width, device=images.device)[None, None, :] < image_sizes[:, 1, None, None]
        inside = (rows & columns)[:, None]
        # flip and elementwise ops keep the channels_last layout the backbone's convolutions want.
        pixels = (images.flip(1) if self.reverse_channels else images).float()
        return torch.where(inside, (pixels - self.mean) / self.std, torch.zeros((), device=images.device))
