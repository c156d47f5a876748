"""Region proposals and RPN losses from the static part's outputs, in fixed-size tensors.

The RPN head itself (torchvision's `RPNHead`) runs in the static part; this module turns its
per-level objectness and deltas into proposals (per-level top-k, decode, clip, NMS per level,
top-N) and, in training, into the two RPN losses.

Anchors are the reference's (maskrcnn-benchmark `generate_anchors`, see `reference_cell_anchors`),
which closed division requires; torchvision's `AnchorGenerator` anchors (centred on multiples
of the stride, its own rounding) come with `model.convention=torchvision`, for torchvision's
COCO checkpoint, which was trained with them. The convention also decides the clipping of
proposals (model/box_ops.py: `clip_boxes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import permute_and_flatten
from torchvision.ops import box_iou

from model.box_ops import clip_boxes, decode_boxes, encode_boxes, padded_nms
from model.choices import CONVENTIONS
from model.losses import rpn_losses
from model.matching import IGNORED, match_to_ground_truth, sample_balanced

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def reference_cell_anchors(stride: int, size: float, aspect_ratios: tuple[float, ...]) -> Tensor:
    """maskrcnn-benchmark's `generate_anchors(stride, (size,), aspect_ratios)`, in our convention: [A, 4].

    Its steps (modeling/rpn/anchor_generator.py): the inclusive window (0, 0, stride-1, stride-1),
    centre (stride-1)/2; `_ratio_enum`: ws = round(sqrt(stride^2 / ratio)), hs = round(ws x ratio)
    (numpy's round, half to even: torch.round agrees); `_scale_enum`: both x size / stride;
    `_mkanchors`: centre -+ (w-1)/2. Its boxes are inclusive pixel ranges; ours are continuous,
    so x2 and y2 gain 1 (e.g. stride 4, size 32, ratio 0.5: [-22, -10, 25, 13] -> [-22, -10, 26, 14],
    48x24 centred on (2, 2)). Computed in float64 as numpy does, then float32 as the reference.
    """
    ratios = torch.tensor(aspect_ratios, dtype=torch.float64)
    ws = torch.round(torch.sqrt(stride * stride / ratios))
    hs = torch.round(ws * ratios)
    ws, hs = ws * (size / stride), hs * (size / stride)
    centre = 0.5 * (stride - 1)
    inclusive = torch.stack(
        (centre - 0.5 * (ws - 1), centre - 0.5 * (hs - 1), centre + 0.5 * (ws - 1), centre + 0.5 * (hs - 1)), dim=1
    )
    return (inclusive + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)).float()


class Anchors:
    """Anchors per FPN level for one padded image shape, computed once per shape and device.

    Level l's anchors are its cell anchors shifted by (x, y) = (j, i) x stride for every grid
    cell (i, j), location-major and anchor-minor, as the reference's `grid_anchors` (and
    torchvision's) lay them out to match the RPN head's flattened outputs.
    """

    def __init__(
        self,
        sizes: tuple[int, ...],
        aspect_ratios: tuple[float, ...],
        strides: tuple[int, ...],
        convention: str = "reference",
    ):
        if convention == "reference":
            self.cell_anchors = [reference_cell_anchors(st, size, aspect_ratios) for size, st in zip(sizes, strides)]
        elif convention == "torchvision":
            torchvision_anchors = AnchorGenerator()
            self.cell_anchors = [torchvision_anchors.generate_anchors([size], list(aspect_ratios)) for size in sizes]
        else:
            raise ValueError(f"model.convention must be one of {CONVENTIONS}, got {convention!r}")
        self.strides = strides
        self.cache: dict[tuple, list[Tensor]] = {}

    def num_per_location(self) -> int:
        return self.cell_anchors[0].shape[0]

    def __call__(self, grid_sizes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        key = (tuple(grid_sizes), str(device))
        if key not in self.cache:
            self.cache[key] = [
                grid_anchors(cell.to(device), (h, w), stride)
                for cell, (h, w), stride in zip(self.cell_anchors, grid_sizes, self.strides)
            ]
        return self.cache[key]


def grid_anchors(cell_anchors: Tensor, grid_size: tuple[int, int], stride: int) -> Tensor:
    """[H*W*A, 4]: `cell_anchors` [A, 4] shifted to every cell of an HxW grid of `stride` pixels."""
    h, w = grid_size
    shifts_x = torch.arange(w, dtype=torch.float32, device=cell_anchors.device) * stride
    shifts_y = torch.arange(h, dtype=torch.float32, device=cell_anchors.device) * stride
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors[None]).reshape(-1, 4)


def flatten_head_outputs(objectness: list[Tensor], deltas: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per level: objectness [B, A, H, W] -> [B, H*W*A]; deltas [B, 4A, H, W] -> [B, H*W*A, 4]."""
    flat_obj, flat_deltas = [], []
    for obj, delta in zip(objectness, deltas):
        b, a, h, w = obj.shape
        flat_obj.append(permute_and_flatten(obj, b, a, 1, h, w).flatten(1).float())
        flat_deltas.append(permute_and_flatten(delta, b, a, 4, h, w).float())
    return flat_obj, flat_deltas


class RegionProposals(nn.Module):
    """Proposals and RPN losses (the reference's RPN without its head).

    post_nms_per_batch: in training the reference (maskrcnn-benchmark, MLPerf) keeps the top
    `post_nms_top_n_train` x images proposals over the whole batch (its FPN_POST_NMS_TOP_N_TRAIN
    in `select_over_all_levels`; MLPerf's num_image_candidates = 1000 x images per GPU), not
    the top `post_nms_top_n_train` of each image as torchvision does; the rules allow either. NMS runs per level on the per-level top `pre_nms_top_n`, and keeps all
    its survivors (the reference's per-level post-NMS cap equals the pre-NMS count).
    straddle_thresh: the reference ignores, in the RPN loss, anchors that
    reach more than this many pixels outside the image (-1: keep all, as torchvision).
    inclusive: clip proposals as the reference does (model/box_ops.py: `clip_boxes`).
    """

    def __init__(
        self,
        anchors: Anchors,
        fg_iou: float,
        bg_iou: float,
        batch_size_per_image: int,
        positive_fraction: float,
        smooth_l1_beta: float,
        nms_thresh: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        post_nms_per_batch: bool,
        min_size: float,
        straddle_thresh: float,
        inclusive: bool,
    ):
        super().__init__()
        self.anchors = anchors
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.smooth_l1_beta = smooth_l1_beta
        self.nms_thresh = nms_thresh
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n
        self.post_nms_per_batch = post_nms_per_batch
        self.min_size = min_size
        self.straddle_thresh = straddle_thresh
        self.inclusive = inclusive

    def _mode(self) -> str:
        return "training" if self.training else "testing"

    @torch.no_grad()
    def propose(
        self, objectness: list[Tensor], deltas: list[Tensor], anchors: list[Tensor], image_sizes: Tensor, sync_free: bool
    ) -> tuple[Tensor, Tensor]:
        """Proposals [B, N, 4] sorted by score per image, and valid [B, N] (False for padding)."""
        level_obj, level_boxes, level_valid = [], [], []
        for obj, delta, level_anchors in zip(objectness, deltas, anchors):
            k = min(self.pre_nms_top_n[self._mode()], obj.shape[1])
            top_obj, top_index = obj.topk(k, dim=1)
            top_deltas = delta.gather(1, top_index[..., None].expand(-1, -1, 4))
            boxes = decode_boxes(top_deltas, level_anchors[top_index], RPN_BOX_WEIGHTS).squeeze(-2)
            boxes = clip_boxes(boxes, image_sizes, self.inclusive)
            wide = boxes[..., 2] - boxes[..., 0] >= self.min_size
            tall = boxes[..., 3] - boxes[..., 1] >= self.min_size
            level_obj.append(top_obj)
            level_boxes.append(boxes)
            level_valid.append(wide & tall)
        # NMS runs per level and image: one call over all B x levels sets, each padded to the
        # largest level's k with invalid boxes (small levels, such as P6, have fewer anchors).
        k_max = max(b.shape[1] for b in level_boxes)
        pad = [k_max - b.shape[1] for b in level_boxes]
        sets = torch.cat([F.pad(b, (0, 0, 0, p)) for b, p in zip(level_boxes, pad)])
        set_valid = torch.cat([F.pad(v, (0, p), value=False) for v, p in zip(level_valid, pad)])
        keep = padded_nms(sets, set_valid, self.nms_thresh, sync_free).split(objectness[0].shape[0])
        level_scores = [
            torch.where(kept[:, : o.shape[1]], torch.sigmoid(o), torch.full_like(o, -1.0))
            for kept, o in zip(keep, level_obj)
        ]
        scores = torch.cat(level_scores, dim=1)
        boxes = torch.cat(level_boxes, dim=1)
        n = self.post_nms_top_n[self._mode()]
        per_batch = self.training and self.post_nms_per_batch
        if per_batch:  # the reference's top n x images of the whole batch: one image may take them all
            n *= scores.shape[0]
        scores, index = scores.topk(min(n, scores.shape[1]), dim=1)
        boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
        valid = scores >= 0
        if per_batch:
            valid = valid & in_top_n_of_batch(scores, n)
        return boxes, valid

    def losses(
        self,
        objectness: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        image_sizes: Tensor,
        gt_boxes: Tensor,
        gt_valid: Tensor,
    ) -> dict[str, Tensor]:
        """The reference's RPN losses: BCE over sampled anchors, smooth L1 over sampled positives."""
        all_anchors = torch.cat(anchors)
        batch, num_gt = gt_boxes.shape[:2]
        iou = box_iou(gt_boxes.reshape(-1, 4), all_anchors).view(batch, num_gt, -1)
        gt_index, label = match_to_ground_truth(iou, gt_valid, self.fg_iou, self.bg_iou, allow_low_quality=True)
        if self.straddle_thresh >= 0:
            label = torch.where(self.inside_image(all_anchors, image_sizes), label, torch.full_like(label, IGNORED))
        index, is_positive, valid = sample_balanced(label, self.batch_size_per_image, self.positive_fraction)
        obj = torch.cat(objectness, dim=1).gather(1, index)
        pred_deltas = torch.cat(deltas, dim=1).gather(1, index[..., None].expand(-1, -1, 4))
        matched = gt_boxes.gather(1, gt_index.gather(1, index)[..., None].expand(-1, -1, 4))
        targets = encode_boxes(matched, all_anchors[index], RPN_BOX_WEIGHTS)
        targets = torch.where(is_positive[..., None], targets, torch.zeros_like(targets))
        loss_objectness, loss_rpn_box_reg = rpn_losses(
            obj, pred_deltas, targets, is_positive, valid, self.smooth_l1_beta
        )
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}

    def inside_image(self, anchors: Tensor, image_sizes: Tensor) -> Tensor:
        """[B, A] whether each anchor lies within its image, up to `straddle_thresh` pixels."""
        h = image_sizes[:, 0:1].to(anchors.dtype)
        w = image_sizes[:, 1:2].to(anchors.dtype)
        t = self.straddle_thresh
        x1, y1, x2, y2 = (c[None, :] for c in anchors.unbind(-1))
        return (x1 >= -t) & (y1 >= -t) & (x2 <= w + t) & (y2 <= h + t)


def in_top_n_of_batch(scores: Tensor, n: int) -> Tensor:
    """[B, N] mask of the n highest `scores` [B, N] over the whole batch (invalid scores are < 0)."""
    flat = scores.flatten()
    top = flat.topk(min(n, flat.numel())).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter(0, top, True).view_as(scores)
