"""Box arithmetic on padded, batched tensors, written so that nothing waits for the host.

torchvision's `BoxCoder` builds small device tensors from Python numbers on every call
(a host-to-device copy the CUDA sync check flags) and its `nms` copies a mask to the host,
so the coder, the clipping and the NMS used between the image and the losses are ours; the
arithmetic follows torchvision's operation by operation so results agree to the bit.

Boxes are continuous (x2 - x1 is the width). maskrcnn-benchmark's are inclusive pixel ranges
with "+1" widths (TO_REMOVE = 1) in its coder, IoU and NMS; with x2 + 1, y2 + 1 its formulas
become these exactly. Where its operators take its inclusive x2, y2 as they are (RoIAlign, the
mask crop, clipping), the model's `convention` decides: "reference" hands them the reference's
coordinates (`inclusive_boxes`, `clip_boxes(..., inclusive=True)`), "torchvision" keeps
torchvision's continuous ones, which its COCO checkpoint was trained with (docs/MLPERF.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou, nms

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # largest log-scale change a decoded box may take
SYNC_FREE_NMS_STEPS = 32  # even: an unsettled NMS keeps a superset of greedy NMS's boxes


def encode_boxes(targets: Tensor, references: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Deltas (dx, dy, dw, dh) that turn `references` [..., 4] into `targets` [..., 4] (xyxy)."""
    wx, wy, ww, wh = weights
    ref_w = references[..., 2] - references[..., 0]
    ref_h = references[..., 3] - references[..., 1]
    ref_x = references[..., 0] + 0.5 * ref_w
    ref_y = references[..., 1] + 0.5 * ref_h
    gt_w = targets[..., 2] - targets[..., 0]
    gt_h = targets[..., 3] - targets[..., 1]
    gt_x = targets[..., 0] + 0.5 * gt_w
    gt_y = targets[..., 1] + 0.5 * gt_h
    dx = wx * (gt_x - ref_x) / ref_w
    dy = wy * (gt_y - ref_y) / ref_h
    dw = ww * torch.log(gt_w / ref_w)
    dh = wh * torch.log(gt_h / ref_h)
    return torch.stack((dx, dy, dw, dh), dim=-1)


def decode_boxes(deltas: Tensor, references: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Boxes [..., C, 4] from deltas [..., C*4] relative to `references` [..., 4] (C boxes each)."""
    references = references.to(deltas.dtype)
    deltas = deltas.unflatten(-1, (-1, 4))
    wx, wy, ww, wh = weights
    widths = (references[..., 2] - references[..., 0]).unsqueeze(-1)
    heights = (references[..., 3] - references[..., 1]).unsqueeze(-1)
    ctr_x = references[..., 0].unsqueeze(-1) + 0.5 * widths
    ctr_y = references[..., 1].unsqueeze(-1) + 0.5 * heights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = torch.clamp(deltas[..., 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(deltas[..., 3] / wh, max=BBOX_XFORM_CLIP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack(
        (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1
    )


def inclusive_boxes(boxes: Tensor) -> Tensor:
    """The reference's inclusive pixel boxes [..., 4] of continuous `boxes`: x2 - 1, y2 - 1."""
    return boxes - boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def clip_boxes(boxes: Tensor, image_sizes: Tensor, inclusive: bool) -> Tensor:
    """Clip boxes [B, ..., 4] to each image's (h, w) in `image_sizes` [B, 2].

    inclusive: the reference's `clip_to_image`, which clamps its inclusive x1 and x2 to
    [0, W - 1]: continuous x1 to [0, W - 1] and x2 to [1, W]. A box wholly outside the image
    becomes the 1-pixel strip along its edge, which NMS merges with its neighbours (zero-width
    boxes, torchvision's [0, W] clamp, overlap nothing and all survive NMS).
    """
    shape = (boxes.shape[0],) + (1,) * (boxes.dim() - 2)
    h = image_sizes[:, 0].to(boxes.dtype).view(shape)
    w = image_sizes[:, 1].to(boxes.dtype).view(shape)
    x1, y1, x2, y2 = boxes.unbind(-1)
    pixel = 1 if inclusive else 0  # the inclusive clamp keeps x1 a pixel before the end, x2 a pixel after the start
    return torch.stack(
        (
            x1.clamp(min=0).minimum(w - pixel),
            y1.clamp(min=0).minimum(h - pixel),
            x2.clamp(min=pixel).minimum(w),
            y2.clamp(min=pixel).minimum(h),
        ),
        dim=-1,
    )


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU [B, N, M] of boxes1 [B, N, 4] against boxes2 [B, M, 4] (torchvision's formula)."""
    return torch.vmap(box_iou)(boxes1, boxes2)


def padded_nms(boxes: Tensor, valid: Tensor, iou_threshold: float, sync_free: bool) -> Tensor:
    """Greedy NMS on fixed-size sets: keep mask [S, N] for boxes [S, N, 4] sorted by descending score.

    Without `sync_free` this is torchvision's `nms` on each set's valid boxes. With it, greedy
    NMS is solved as a fixed point instead (the "Cluster-NMS" iteration): box i is kept unless
    a kept box j ranked above it overlaps it by more than the threshold, iterated from "all
    valid kept". Each step settles at least the next box in score order and the fixed point is
    exactly greedy NMS. The iterates alternate around it (odd steps keep a subset of its boxes,
    even steps a superset) and close in on it; we run an even SYNC_FREE_NMS_STEPS without
    looking, so the host never waits and an unsettled set can only keep a few extra boxes.
    Closed division: the reference's NMS is greedy; this computes the same keep set whenever
    it settles within the steps (a mathematically equivalent schedule of the same fixed point).
    Dense FPN-level sets of 2000 RPN-like boxes at IoU 0.7 (P2/P3 top 2000 around 40 objects)
    settled within 10 steps, and tests/test_model_proposals.py checks the equality.
    """
    if not sync_free:
        keep = torch.zeros_like(valid)
        for i in range(boxes.shape[0]):
            index = torch.where(valid[i])[0]
            keep[i, index[nms(boxes[i, index], -index.to(boxes.dtype), iou_threshold)]] = True
        return keep
    iou = batched_box_iou(boxes, boxes)
    upper = torch.ones(iou.shape[-2:], dtype=torch.bool, device=boxes.device).triu(1)
    # [S, j, i]: j ranks above i and overlaps it. 0/1 entries, and the counts the products
    # sum, are exact where it matters in bfloat16 (a positive count never rounds to 0), at
    # half float32's bytes. Built once with autocast off, so that autocast does not recast
    # the [S, N, N] matrix on each step.
    with torch.autocast(boxes.device.type, enabled=False):
        suppresses = ((iou > iou_threshold) & upper).to(torch.bfloat16)
        keep = valid
        for _ in range(SYNC_FREE_NMS_STEPS):
            suppressed = torch.bmm(keep.to(torch.bfloat16).unsqueeze(1), suppresses).squeeze(1) > 0
            keep = valid & ~suppressed
    return keep
