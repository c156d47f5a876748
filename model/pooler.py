"""Multi-level RoIAlign over FPN levels P2-P5 that never needs the host.

torchvision's `MultiScaleRoIAlign` picks each level's RoIs with `torch.where` (a host
synchronization on CUDA). Ours keeps `roi_align` (aligned=False, the reference's ROIAlign) and
the FPN level rule (canonical level 4 at 224 pixels) in the convention's coordinates: with
`inclusive`, RoIs arrive as the reference's inclusive pixel boxes (x2, y2 one pixel in: its
Pooler hands them to ROIAlign as they are) and take the reference's `LevelMapper`, sqrt of
the +1 area, log2(s / 224 + 1e-6); otherwise continuous boxes and torchvision's `LevelMapper`
(log2(s / 224) + 1e-6: the two differ only within 1e-6 of a level boundary). Off the sync-free path it pools only the RoIs of each level, as
torchvision does. On the sync-free path every level's `roi_align` gets every RoI, with the
RoIs of the other levels moved far outside the feature map: roi_align returns zero for a
sample outside the map without reading it, and its backward adds nothing for it (the CUDA
kernel skips the atomic adds), so the sum over levels is each RoI pooled at its own level,
bit for bit as torchvision pools it, with one level's worth of gradient scatter.

The features must arrive as float32 NCHW (`MaskRCNN.forward` converts P2-P5 once for both
poolers): torchvision's CUDA kernels have no bfloat16 version, and under autocast its wrapper
would cast every level to float32 again on every call, and make it contiguous, per pooler.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper

# An RoI corner further outside than any feature map reaches (at the coarsest stride, 32,
# it lies 300 cells outside): every sample of such an RoI is out of range.
OUTSIDE = -1e4
LEVEL_EPS = 1e-6  # the reference LevelMapper's epsilon


class MultiLevelRoIAlign(nn.Module):
    def __init__(
        self,
        output_size: int,
        sampling_ratio: int,
        strides: tuple[int, ...],
        canonical_scale: int,
        canonical_level: int,
        inclusive: bool,
    ):
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.scales = [1.0 / s for s in strides]
        levels = [round(math.log2(s)) for s in strides]
        self.k_min, self.k_max = levels[0], levels[-1]
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level
        self.inclusive = inclusive
        self.mapper = LevelMapper(levels[0], levels[-1], canonical_scale=canonical_scale, canonical_level=canonical_level)

    def levels(self, boxes: Tensor) -> Tensor:
        """The pyramid level index [R] (0 for P2) of boxes [R, 4] in the convention's coordinates."""
        if not self.inclusive:
            return self.mapper([boxes])
        x1, y1, x2, y2 = boxes.unbind(-1)
        size = torch.sqrt((x2 - x1 + 1) * (y2 - y1 + 1))
        level = torch.floor(self.canonical_level + torch.log2(size / self.canonical_scale + LEVEL_EPS))
        return level.clamp(self.k_min, self.k_max).to(torch.int64) - self.k_min

    def forward(self, features: list[Tensor], rois: Tensor, sync_free: bool) -> Tensor:
        """Pool rois [R, 5] (image index, x1, y1, x2, y2 in input pixels, in the convention's coordinates) -> [R, C, S, S]."""
        levels = self.levels(rois[:, 1:])
        size = self.output_size
        result = None
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            if sync_free:
                mine = (levels == level)[:, None]
                level_rois = torch.cat([rois[:, :1], torch.where(mine, rois[:, 1:], OUTSIDE)], dim=1)
                pooled = roi_align(feature, level_rois, size, scale, self.sampling_ratio, aligned=False)
                result = pooled if result is None else result + pooled
                continue
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], size, scale, self.sampling_ratio, aligned=False)
            if result is None:
                result = pooled.new_zeros((rois.shape[0],) + pooled.shape[1:])
            result.index_put_((index,), pooled)  # in place, as torchvision: no copy of the whole result per level
        return result


def boxes_to_rois(boxes: Tensor) -> Tensor:
    """Padded boxes [B, N, 4] -> rois [B*N, 5] with the image index in front."""
    batch, num_boxes = boxes.shape[:2]
    image_index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype)[:, None, None].expand(-1, num_boxes, 1)
    return torch.cat([image_index, boxes], dim=2).reshape(-1, 5)
