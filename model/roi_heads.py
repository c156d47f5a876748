"""Box and mask heads: sampling, losses and inference on padded per-image tensors.

The heads are torchvision's modules (`TwoMLPHead`, `FastRCNNPredictor`, `MaskRCNNHeads`,
`MaskRCNNPredictor`) with the reference's initialization; sampling, losses and the mask
targets are written for fixed-size tensors so the training step never waits for the host.
On CUDA the mask head runs on every positive slot (batch_size_per_image x positive_fraction
per image) and padding rows are masked out of the loss: the same loss as the reference's
mean over the positive RoIs, at a fixed cost (docs/MLPERF.md).

Boxes are continuous throughout; with `inclusive` (model.convention=reference) RoIAlign and the
mask crop get the reference's inclusive pixel boxes (`roi_boxes`), and detections are clipped
as the reference clips them (model/box_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import nms

from model.box_ops import batched_box_iou, clip_boxes, decode_boxes, encode_boxes, inclusive_boxes
from model.detections import Detections
from model.losses import box_head_losses, mask_loss
from model.mask_targets import polygon_mask_targets
from model.pooler import MultiLevelRoIAlign, boxes_to_rois
from model.matching import IGNORED, match_to_ground_truth, sample_balanced

MIN_DETECTION_SIZE = 1e-2  # torchvision drops detections thinner than this before NMS (the reference does not)


class RoIHeads(nn.Module):
    def __init__(
        self,
        box_pool: MultiLevelRoIAlign,
        box_head: TwoMLPHead,
        box_predictor: FastRCNNPredictor,
        mask_pool: MultiLevelRoIAlign,
        mask_head: MaskRCNNHeads,
        mask_predictor: MaskRCNNPredictor,
        fg_iou: float,
        bg_iou: float,
        batch_size_per_image: int,
        positive_fraction: float,
        bbox_reg_weights: tuple[float, float, float, float],
        smooth_l1_beta: float,
        mask_resolution: int,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        inclusive: bool,
    ):
        super().__init__()
        self.box_pool, self.box_head, self.box_predictor = box_pool, box_head, box_predictor
        self.mask_pool, self.mask_head, self.mask_predictor = mask_pool, mask_head, mask_predictor
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.bbox_reg_weights = tuple(bbox_reg_weights)
        self.smooth_l1_beta = smooth_l1_beta
        self.mask_resolution = mask_resolution
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img = detections_per_img
        self.inclusive = inclusive

    def roi_boxes(self, boxes: Tensor) -> Tensor:
        """What RoIAlign and the mask crop take for continuous `boxes`: the convention's coordinates."""
        return inclusive_boxes(boxes) if self.inclusive else boxes

    def box_logits(self, features: list[Tensor], boxes: Tensor, sync_free: bool) -> tuple[Tensor, Tensor]:
        """Class logits [B, N, K] and class-specific deltas [B, N, 4K] for boxes [B, N, 4]."""
        pooled = self.box_pool(features, boxes_to_rois(self.roi_boxes(boxes)), sync_free)
        class_logits, deltas = self.box_predictor(self.box_head(pooled))
        return class_logits.unflatten(0, boxes.shape[:2]), deltas.unflatten(0, boxes.shape[:2])

    def mask_logits(self, features: list[Tensor], rois: Tensor, labels: Tensor, sync_free: bool) -> Tensor:
        """Mask logits [R, S, S] of class `labels` [R] for rois [R, 5] (image index + box in the convention's coordinates)."""
        logits = self.mask_predictor(self.mask_head(self.mask_pool(features, rois, sync_free)))
        index = labels.reshape(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:])
        return logits.gather(1, index).squeeze(1)

    def losses(
        self,
        features: list[Tensor],
        proposals: Tensor,
        proposal_valid: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        verts: Tensor,
        polys: Tensor,
        num_polys: Tensor,
    ) -> dict[str, Tensor]:
        """The reference's box and mask losses over proposals [B, N, 4] plus the ground truth."""
        boxes = torch.cat([proposals, gt_boxes], dim=1)
        valid = torch.cat([proposal_valid, gt_valid], dim=1)
        iou = batched_box_iou(gt_boxes, boxes)
        gt_index, match = match_to_ground_truth(iou, gt_valid, self.fg_iou, self.bg_iou, allow_low_quality=False)
        match = torch.where(valid, match, torch.full_like(match, IGNORED))
        index, is_positive, sampled = sample_balanced(match, self.batch_size_per_image, self.positive_fraction)
        boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
        gt_index = gt_index.gather(1, index)
        labels = torch.where(is_positive, gt_labels.gather(1, gt_index), torch.zeros_like(gt_index))
        matched = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))
        targets = encode_boxes(matched, boxes, self.bbox_reg_weights)
        targets = torch.where(is_positive[..., None], targets, torch.zeros_like(targets))

        sync_free = boxes.is_cuda  # losses are computed in training only
        class_logits, deltas = self.box_logits(features, boxes, sync_free)
        loss_classifier, loss_box_reg = box_head_losses(
            class_logits.float(), deltas.float(), labels, targets, sampled, self.smooth_l1_beta
        )

        # Positives come first among the samples, so the first max-positive slots hold them all.
        num_mask = min(int(self.batch_size_per_image * self.positive_fraction), boxes.shape[1])
        mask_boxes = self.roi_boxes(boxes[:, :num_mask])
        mask_targets = polygon_mask_targets(
            mask_boxes, gt_index[:, :num_mask], verts, polys, num_polys, self.mask_resolution, sync_free
        ).flatten(0, 1)
        rois, mask_labels = boxes_to_rois(mask_boxes), labels[:, :num_mask].flatten()
        mask_positive = is_positive[:, :num_mask].flatten()
        if not sync_free:
            # Off the sync-free path, run the (costly) mask head on real positives only.
            rows = torch.where(mask_positive)[0]
            rois, mask_labels, mask_targets = rois[rows], mask_labels[rows], mask_targets[rows]
            mask_positive = mask_positive[rows]
        mask_logits = self.mask_logits(features, rois, mask_labels, sync_free).float()
        return {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": mask_loss(mask_logits, mask_targets, mask_positive),
        }

    @torch.no_grad()
    def detect(self, features: list[Tensor], proposals: Tensor, proposal_valid: Tensor, image_sizes: Tensor) -> Detections:
        """Per image: the top D detections after score threshold and per-class NMS, with their masks, padded to D."""
        class_logits, deltas = self.box_logits(features, proposals, sync_free=False)
        boxes, scores, labels, num_detections = postprocess_detections(
            class_logits.float(),
            deltas.float(),
            proposals,
            proposal_valid,
            image_sizes,
            bbox_reg_weights=self.bbox_reg_weights,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img,
            inclusive=self.inclusive,
        )
        batch, d = boxes.shape[:2]
        rois = boxes_to_rois(self.roi_boxes(boxes))
        mask_probs = torch.sigmoid(self.mask_logits(features, rois, labels.flatten(), sync_free=False).float())
        filled = torch.arange(d, device=boxes.device)[None, :] < num_detections[:, None]
        mask_probs = mask_probs.unflatten(0, (batch, d)) * filled[..., None, None]
        return Detections(boxes, scores, labels, mask_probs, num_detections, inclusive=self.inclusive)


@torch.no_grad()
def postprocess_detections(
    class_logits: Tensor,
    deltas: Tensor,
    proposals: Tensor,
    proposal_valid: Tensor,
    image_sizes: Tensor,
    *,
    bbox_reg_weights: tuple[float, float, float, float],
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    inclusive: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The box head's detections: boxes [B, D, 4], scores [B, D], labels [B, D], counts [B].

    class_logits [B, N, K] and deltas [B, N, 4K] of proposals [B, N, 4] (valid [B, N]). As the
    reference's `PostProcessor`: softmax, each class's box decoded and clipped (the convention's
    clip), scores above `score_thresh`, NMS per class, the D best over all classes (rows sorted
    by score, zero past each image's count). torchvision (inclusive=False) also drops boxes
    thinner than MIN_DETECTION_SIZE before NMS.

    Written without host-side counts (selections are index tensors, the top D a padded gather),
    so that torch.export, and through it tools/export.py's ONNX file, follows it as it runs here.
    """
    scores = F.softmax(class_logits, dim=-1)
    boxes = clip_boxes(decode_boxes(deltas, proposals, bbox_reg_weights), image_sizes, inclusive)
    batch, num_proposals, num_classes = scores.shape
    d = detections_per_img
    # Every (proposal, class) pair of an image in proposal-major order, background left out.
    class_boxes = boxes[:, :, 1:].reshape(batch, -1, 4)
    class_scores = scores[:, :, 1:].reshape(batch, -1)
    class_labels = torch.arange(1, num_classes, device=boxes.device).repeat(num_proposals)
    candidate = proposal_valid.repeat_interleave(num_classes - 1, dim=1) & (class_scores > score_thresh)
    if not inclusive:
        widths, heights = (class_boxes[..., 2:] - class_boxes[..., :2]).unbind(-1)
        candidate = candidate & (widths >= MIN_DETECTION_SIZE) & (heights >= MIN_DETECTION_SIZE)
    slots = torch.arange(d, device=boxes.device)
    out_boxes, out_scores, out_labels, num_detections = [], [], [], []
    for i in range(batch):
        index = torch.where(candidate[i])[0]
        keep = index[class_nms(class_boxes[i, index], class_scores[i, index], class_labels[index], nms_thresh)]
        count = torch.clamp((keep >= 0).sum(), max=d)  # NMS keeps by descending score: the top D come first
        chosen = torch.cat([keep, keep.new_zeros(d)])[:d]
        filled = slots < count
        out_boxes.append(torch.where(filled[:, None], class_boxes[i, chosen], 0.0))
        out_scores.append(torch.where(filled, class_scores[i, chosen], 0.0))
        out_labels.append(torch.where(filled, class_labels[chosen], 0))
        num_detections.append(count.to(torch.int32))
    return torch.stack(out_boxes), torch.stack(out_scores), torch.stack(out_labels), torch.stack(num_detections)


def class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's `batched_nms` (NMS within each class), by its coordinate trick at every size.

    torchvision picks between this and a per-class loop by the input's size, a branch on a
    data-dependent count that torch.export cannot follow; both keep the same boxes. The offset
    parts the classes' boxes (each class's shifted past the largest coordinate), then one NMS.
    """
    largest = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()  # an empty input has no max
    offsets = labels.to(boxes.dtype) * (largest + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def init_reference_heads(box_head: TwoMLPHead, box_predictor: FastRCNNPredictor, mask_predictor: MaskRCNNPredictor) -> None:
    """The reference's initialization where torchvision's modules differ from it.

    maskrcnn-benchmark (`make_fc`, `FPNPredictor`, `MaskRCNNC4Predictor`): box-head FCs
    kaiming-uniform (a=1), class scores N(0, 0.01), box deltas N(0, 0.001), and every bias 0;
    torchvision keeps nn.Linear's defaults in the box head and predictor, and the default
    uniform biases of the mask predictor (its zeroing is commented out). Weights that already
    match: the FPN (kaiming-uniform a=1), the RPN head (N(0, 0.01)), the mask head convs and the
    mask predictor's weights (kaiming-normal, fan-out, ReLU), all with zero biases.
    """
    for fc in (box_head.fc6, box_head.fc7):
        nn.init.kaiming_uniform_(fc.weight, a=1)
        nn.init.zeros_(fc.bias)
    nn.init.normal_(box_predictor.cls_score.weight, std=0.01)
    nn.init.normal_(box_predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(box_predictor.cls_score.bias)
    nn.init.zeros_(box_predictor.bbox_pred.bias)
    nn.init.zeros_(mask_predictor.conv5_mask.bias)
    nn.init.zeros_(mask_predictor.mask_fcn_logits.bias)
