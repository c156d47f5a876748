"""The five training losses against independent computations, fed the same anchors, samples and RoIs.

Our sampler's draw is recorded (the sampler itself is tested in test_model_training.py) and
handed to the other side, which recomputes everything else on its own:
- RPN: torchvision's `Matcher` and `BoxCoder`, the reference's anchor visibility rule, and
  torchvision's `RegionProposalNetwork.compute_loss` (the reference's formulas: BCE mean over
  the sampled anchors; smooth L1, beta 1/9, summed over positives / number sampled);
- box head: torchvision's `Matcher` and `MultiScaleRoIAlign`, a transcription of
  maskrcnn-benchmark's `BoxCoder.encode` (inclusive boxes, TO_REMOVE = 1) and of its
  `FastRCNNLossComputation` (cross-entropy mean over the sampled RoIs; smooth L1, beta 1,
  of the true class's deltas summed over positives / number sampled). torchvision's
  `fastrcnn_loss` fixes beta at 1/9, so it is not the reference's;
- mask head: the reference's `MaskRCNNLossComputation`: BCE of the true class's logits, mean
  over every pixel of every positive RoI, against our mask targets (those are compared with
  pycocotools in test_model_mask_targets.py).
"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, box_iou

import model.roi_heads
import model.rpn
from model import build_model
from model.losses import mask_loss
from tests.model_helpers import TINY, batch_from, model_config

H, W = 128, 160
GRIDS = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]


def record(monkeypatch, module, name):
    """Wrap module.name so its return value is kept in the returned list."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(module, name, wrapper)
    return calls


def check_sample(labels: torch.Tensor, index, is_positive, valid, num_samples: int, fraction: float):
    """Our draw is one the reference's sampler could make from `labels` (> 0 positive, 0 negative, -1 neither)."""
    positives, negatives = index[is_positive], index[valid & ~is_positive]
    assert labels[positives].gt(0).all() and labels[negatives].eq(0).all()
    assert positives.numel() == min(int(num_samples * fraction), int(labels.gt(0).sum()))
    assert negatives.numel() == min(num_samples - positives.numel(), int(labels.eq(0).sum()))
    assert torch.cat([positives, negatives]).unique().numel() == positives.numel() + negatives.numel()
    return positives, negatives


def reference_smooth_l1_sum(input, target, beta):
    """maskrcnn_benchmark/layers/smooth_l1_loss.py with size_average=False."""
    n = torch.abs(input - target)
    return torch.where(n < beta, 0.5 * n**2 / beta, n - 0.5 * beta).sum()


def reference_encode(reference_boxes, proposals, weights):
    """maskrcnn_benchmark/modeling/box_coder.py `BoxCoder.encode`, on the reference's inclusive boxes."""
    to_inclusive = torch.tensor([0.0, 0.0, 1.0, 1.0])
    reference_boxes, proposals = reference_boxes - to_inclusive, proposals - to_inclusive
    ex_widths = proposals[:, 2] - proposals[:, 0] + 1
    ex_heights = proposals[:, 3] - proposals[:, 1] + 1
    ex_ctr_x = proposals[:, 0] + 0.5 * ex_widths
    ex_ctr_y = proposals[:, 1] + 0.5 * ex_heights
    gt_widths = reference_boxes[:, 2] - reference_boxes[:, 0] + 1
    gt_heights = reference_boxes[:, 3] - reference_boxes[:, 1] + 1
    gt_ctr_x = reference_boxes[:, 0] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[:, 1] + 0.5 * gt_heights
    wx, wy, ww, wh = weights
    return torch.stack(
        (
            wx * (gt_ctr_x - ex_ctr_x) / ex_widths,
            wy * (gt_ctr_y - ex_ctr_y) / ex_heights,
            ww * torch.log(gt_widths / ex_widths),
            wh * torch.log(gt_heights / ex_heights),
        ),
        dim=1,
    )


GT_BOXES = [
    [[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 150.0, 60.0], [0.0, 80.0, 40.0, 128.0]],  # one at the border
    [[30.0, 30.0, 90.0, 100.0], [100.0, 5.0, 130.0, 40.0]],
    [],  # no ground truth: every sampled anchor is a negative
]


def test_rpn_losses_equal_torchvision_on_the_same_samples(monkeypatch):
    rpn = build_model(model_config(*TINY)).proposals.train()
    anchors = rpn.anchors(GRIDS, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    batch = len(GT_BOXES)
    objectness = [torch.randn(batch, a.shape[0], generator=generator) for a in anchors]
    deltas = [0.3 * torch.randn(batch, a.shape[0], 4, generator=generator) for a in anchors]
    gt = torch.zeros(batch, 3, 4)
    gt_valid = torch.zeros(batch, 3, dtype=torch.bool)
    for i, boxes in enumerate(GT_BOXES):
        gt[i, : len(boxes)] = torch.tensor(boxes).reshape(-1, 4)
        gt_valid[i, : len(boxes)] = True
    sizes = torch.tensor([[H, W], [H - 8, W - 20], [H, W]], dtype=torch.int32)
    samples = record(monkeypatch, model.rpn, "sample_balanced")

    ours = rpn.losses(objectness, deltas, anchors, sizes, gt, gt_valid)

    ((index, is_positive, valid),) = samples
    all_anchors = torch.cat(anchors)
    matcher, coder = Matcher(0.7, 0.3, allow_low_quality_matches=True), BoxCoder((1.0, 1.0, 1.0, 1.0))
    labels, targets, positive_masks, negative_masks = [], [], [], []
    for i in range(batch):
        image_gt = gt[i][gt_valid[i]]
        if image_gt.numel():
            matched = matcher(box_iou(image_gt, all_anchors))
            image_labels = (matched >= 0).float()
            image_labels[matched == Matcher.BELOW_LOW_THRESHOLD] = 0.0
            image_labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1.0
            image_targets = coder.encode_single(image_gt[matched.clamp(min=0)], all_anchors)
        else:
            image_labels, image_targets = torch.zeros(all_anchors.shape[0]), torch.zeros_like(all_anchors)
        # The reference's visibility (AnchorGenerator.add_visibility_to, straddle_thresh 0) on its
        # inclusive boxes: x1 >= 0, y1 >= 0, x2 < width, y2 < height.
        h, w = sizes[i].tolist()
        x1, y1, x2, y2 = (all_anchors - torch.tensor([0.0, 0.0, 1.0, 1.0])).unbind(1)
        image_labels[~((x1 >= 0) & (y1 >= 0) & (x2 < w) & (y2 < h))] = -1.0
        positives, negatives = check_sample(image_labels, index[i], is_positive[i], valid[i], 256, 0.5)
        labels.append(image_labels)
        targets.append(image_targets)
        positive_masks.append(torch.zeros_like(image_labels, dtype=torch.bool).index_fill(0, positives, True))
        negative_masks.append(torch.zeros_like(image_labels, dtype=torch.bool).index_fill(0, negatives, True))
    assert int(is_positive[:2].sum()) > 0 and int(is_positive[2].sum()) == 0

    torchvision_rpn = SimpleNamespace(fg_bg_sampler=lambda _: (positive_masks, negative_masks))
    theirs = RegionProposalNetwork.compute_loss(
        torchvision_rpn, torch.cat(objectness, 1).flatten(), torch.cat(deltas, 1).flatten(0, 1), labels, targets
    )
    torch.testing.assert_close(ours["loss_objectness"], theirs[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours["loss_rpn_box_reg"], theirs[1], rtol=1e-5, atol=1e-7)


def test_box_and_mask_losses_equal_the_reference_formulas_on_the_same_samples(monkeypatch):
    # torchvision's continuous RoIs, so that its MultiScaleRoIAlign pools what ours does; the
    # reference's inclusive ones are checked against its own Pooler in tests/reference/.
    torch.manual_seed(0)
    config = model_config(*TINY, "model.roi_heads.batch_size_per_image=32", "model.convention=torchvision")
    net = build_model(config, num_classes=5).train()
    heads = net.roi_heads
    generator = torch.Generator().manual_seed(1)
    def triangles(boxes):  # one triangle inside each box, so a mask is not just its box
        return [[[[x1, y1], [x1, y2], [x2, y2]]] for x1, y1, x2, y2 in boxes]

    gt_labels = [[1, 3, 4], [2, 2]]
    gt_batch = batch_from(torch.zeros(2, 3, H, W), GT_BOXES[:2], gt_labels, [triangles(b) for b in GT_BOXES[:2]])
    gt_valid = torch.arange(3)[None] < gt_batch.num_boxes[:, None]
    # Proposals: jittered ground truth (positives) and random boxes (mostly negatives); some padding.
    jittered = gt_batch.boxes.repeat(1, 8, 1) + 6 * torch.randn(2, 24, 4, generator=generator)
    xy = torch.rand(2, 40, 2, generator=generator) * torch.tensor([W - 30, H - 30])
    random_boxes = torch.cat([xy, xy + 10 + 40 * torch.rand(2, 40, 2, generator=generator)], dim=2)
    proposals = torch.cat([jittered, random_boxes], dim=1).clamp(min=0).minimum(torch.tensor([W, H, W, H]))
    proposal_valid = torch.rand(2, 64, generator=generator) > 0.1
    proposal_valid[1, 16:24] = False  # jittered copies of image 1's padding row are not proposals
    features = [torch.randn(2, 32, h, w, generator=generator) for h, w in GRIDS[:4]]
    samples = record(monkeypatch, model.roi_heads, "sample_balanced")
    mask_targets = record(monkeypatch, model.roi_heads, "polygon_mask_targets")

    ours = heads.losses(
        features, proposals, proposal_valid, gt_batch.boxes, gt_batch.labels, gt_valid,
        gt_batch.verts, gt_batch.polys, gt_batch.num_polys,
    )  # fmt: skip

    ((index, is_positive, valid),) = samples
    candidates = torch.cat([proposals, gt_batch.boxes], dim=1)
    candidate_valid = torch.cat([proposal_valid, gt_valid], dim=1)
    matcher = Matcher(0.5, 0.5, allow_low_quality_matches=False)
    boxes, labels, targets, mask_boxes, mask_labels, mask_target_rows = [], [], [], [], [], []
    for i in range(2):
        image_gt, image_gt_labels = gt_batch.boxes[i][gt_valid[i]], gt_batch.labels[i][gt_valid[i]]
        matched = matcher(box_iou(image_gt, candidates[i]))
        image_labels = image_gt_labels[matched.clamp(min=0)]
        image_labels[matched == Matcher.BELOW_LOW_THRESHOLD] = 0
        image_labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1
        image_labels[~candidate_valid[i]] = -1
        positives, negatives = check_sample(image_labels, index[i], is_positive[i], valid[i], 32, 0.25)
        sampled = torch.cat([positives, negatives])
        boxes.append(candidates[i][sampled])
        labels.append(image_labels[sampled])
        matched_gt = image_gt[matched[sampled].clamp(min=0)]
        targets.append(reference_encode(matched_gt, candidates[i][sampled], (10.0, 10.0, 5.0, 5.0)))
        # Positives occupy the first sample slots, in the order the mask targets were made.
        mask_boxes.append(candidates[i][positives])
        mask_labels.append(image_labels[positives])
        mask_target_rows.append(mask_targets[0][i, : positives.numel()])
    labels, targets = torch.cat(labels), torch.cat(targets)
    assert int(labels.gt(0).sum()) > 4 and int(labels.eq(0).sum()) > 4

    named = {str(k): f for k, f in enumerate(features)}
    image_sizes = [(H, W)] * 2
    box_pool = MultiScaleRoIAlign(list(named), 7, 2)
    class_logits, box_regression = heads.box_predictor(heads.box_head(box_pool(named, boxes, image_sizes)))
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    class_deltas = box_regression.view(len(labels), -1, 4)[positive, labels[positive]]
    box_loss = reference_smooth_l1_sum(class_deltas, targets[positive], beta=1.0) / labels.numel()

    mask_pool = MultiScaleRoIAlign(list(named), 14, 2)
    mask_logits = heads.mask_predictor(heads.mask_head(mask_pool(named, mask_boxes, image_sizes)))
    mask_labels = torch.cat(mask_labels)
    mask_loss = F.binary_cross_entropy_with_logits(
        mask_logits[torch.arange(len(mask_labels)), mask_labels], torch.cat(mask_target_rows)
    )

    torch.testing.assert_close(ours["loss_classifier"], classification_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss_box_reg"], box_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["loss_mask"], mask_loss, rtol=1e-5, atol=1e-6)


def test_mask_loss_ignores_the_padding_rows_of_the_sync_free_layout():
    # On CUDA the mask head runs on every positive slot, padding included; rows that are not
    # positives must not count, so the loss is the reference's mean over the positive rows.
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 28, 28, generator=generator)
    targets = (torch.rand(6, 28, 28, generator=generator) > 0.5).float()
    is_positive = torch.tensor([True, True, False, True, False, False])
    logits[4] = float("nan")  # a padding row's garbage cannot leak in
    expected = F.binary_cross_entropy_with_logits(logits[is_positive], targets[is_positive])
    torch.testing.assert_close(mask_loss(logits, targets, is_positive), expected)
