"""Differential test: our Mask R-CNN against torchvision's maskrcnn_resnet50_fpn, same weights, same input.

torchvision is built with random weights (weights=None, weights_backbone=None) and its
BatchNorms turned into FrozenBatchNorm2d with random statistics, as in its published COCO
model (built on a pretrained, frozen backbone). Our model takes its state dict through
`load_torchvision_maskrcnn` with the identity category map (91 classes), torchvision's anchors
(`model.convention=torchvision`: its anchors and continuous boxes; the reference's differ, tests/reference/)
and its proposal `min_size` (1e-3; the reference's is 0). Both keep 300 proposals and 20 detections
per image instead of 1000 and 100, to keep the test fast.
"""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d

from model import build_model
from model.rpn import flatten_head_outputs
from model.weights import load_torchvision_maskrcnn
from tests.model_helpers import batch_from, model_config

H, W = 256, 320


def freeze_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with random affine and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features)
            c = child.num_features
            frozen.weight.copy_(1 + 0.1 * torch.randn(c, generator=generator))
            frozen.bias.copy_(0.1 * torch.randn(c, generator=generator))
            frozen.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            frozen.running_var.copy_(1 + 0.1 * torch.rand(c, generator=generator))
            setattr(module, name, frozen)
        else:
            freeze_norms(child, generator)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, rpn_post_nms_top_n_test=300, box_detections_per_img=20
    ).eval()
    freeze_norms(theirs, torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Random-weight class scores are ~1/91, under the 0.05 threshold: favour a few classes.
        bias = theirs.roi_heads.box_predictor.cls_score.bias
        bias[0] -= 10.0
        bias[1:8] += 4.0
    ours = build_model(
        model_config(
            "model.backbone.stride_in_1x1=false",
            "model.normalization=rgb",
            "model.convention=torchvision",
            "model.rpn.min_size=0.001",
            "model.rpn.post_nms_top_n_test=300",
            "model.roi_heads.detections_per_img=20",
        ),
        num_classes=91,
    ).eval()
    load_torchvision_maskrcnn(ours, theirs.state_dict(), coco_ids=range(1, 91))
    images = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    return theirs, ours, batch_from(images, [[], []], [[], []], [[], []])


def normalized(ours, batch):
    """What torchvision's transform makes of the images: our normalization is checked separately."""
    return ours.static_part.normalize(batch.images, batch.image_sizes)


@torch.no_grad()
def test_fpn_features_and_rpn_proposals_match(models):
    theirs, ours, batch = models
    their_features = theirs.backbone(normalized(ours, batch))
    outputs = ours.static_part(batch.images, batch.image_sizes)
    for ours_f, theirs_f in zip(outputs[:5], their_features.values()):
        # Our backbone folds each frozen BN into its convolution: the same map, rounded
        # differently (features reach ~150 here), so the bound is relative to their scale.
        torch.testing.assert_close(ours_f, theirs_f, atol=1e-4 * float(theirs_f.abs().max()), rtol=0)

    # Proposals from the same features on both sides: our RPN head, decoding, NMS and top-N.
    their_proposals, _ = theirs.rpn(ImageList(normalized(ours, batch), [(H, W)] * 2), their_features)
    features = list(their_features.values())
    objectness, deltas = flatten_head_outputs(*ours.static_part.rpn_head(features))
    anchors = ours.proposals.anchors([tuple(f.shape[-2:]) for f in features], batch.images.device)
    proposals, valid = ours.proposals.propose(objectness, deltas, anchors, batch.image_sizes, sync_free=False)
    for i in range(2):
        assert valid[i].sum() == len(their_proposals[i])
        torch.testing.assert_close(proposals[i][valid[i]], their_proposals[i], atol=1e-4, rtol=0)


@torch.no_grad()
def test_eval_detections_match(models, monkeypatch):
    theirs, ours, batch = models
    # Everything after the backbone, from the same features: ours runs on torchvision's backbone
    # (the same weights, BNs unfolded), which the test above compares with ours.
    monkeypatch.setattr(ours.static_part, "backbone", theirs.backbone)
    features = theirs.backbone(normalized(ours, batch))
    image_sizes = [(H, W)] * 2
    proposals, _ = theirs.rpn(ImageList(normalized(ours, batch), image_sizes), features)
    expected, _ = theirs.roi_heads(features, proposals, image_sizes)
    detections = ours(batch)
    for i, exp in enumerate(expected):
        n = int(detections.num_detections[i])
        assert n == len(exp["boxes"]) > 0
        torch.testing.assert_close(detections.boxes[i, :n], exp["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(detections.scores[i, :n], exp["scores"], atol=1e-5, rtol=0)
        assert torch.equal(detections.labels[i, :n], exp["labels"])
        torch.testing.assert_close(detections.mask_probs[i, :n], exp["masks"][:, 0], atol=1e-4, rtol=0)
        assert detections.scores[i, n:].eq(0).all() and detections.labels[i, n:].eq(0).all()
