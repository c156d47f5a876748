"""The model beside the MLPerf reference's own code (maskrcnn-benchmark v3.1): same inputs, same results.

Ours are continuous boxes, the reference's inclusive pixel boxes: a box goes from ours to theirs
as x2 - 1, y2 - 1 (`inclusive_boxes`), and the inputs are made in the reference's coordinates
and shifted to ours. The inputs are the ones that found differences: a padded batch whose first
image is smaller than the batch, anchors and proposals reaching outside the image, objects under
40 pixels, multi-part and overlapping polygons. Where the reference draws random samples, ours
take the reference's draw (`inject_samples`) and everything downstream is compared.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import model.roi_heads
import model.rpn
from model import build_model
from model.backbone import conv_norm
from model.box_ops import decode_boxes, encode_boxes, inclusive_boxes
from model.mask_targets import polygon_mask_targets
from model.matching import match_to_ground_truth, sample_balanced
from model.pooler import MultiLevelRoIAlign, boxes_to_rois
from model.rpn import Anchors, flatten_head_outputs
from reference_oracle import reference, requires_reference
from tests.model_helpers import TINY, batch_from, model_config

pytestmark = [
    requires_reference,
    # pycocotools' decode and the reference's uint8 masks trip numpy 2 / torch deprecations (not ours).
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

H, W = 128, 160  # the padded batch
SIZES = [(96, 130), (128, 160)]  # the first image is smaller than its batch, the second fills it
STRIDES = (4, 8, 16, 32, 64)
ANCHOR_SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)
POOLER_SCALES = (0.25, 0.125, 0.0625, 0.03125)
NUM_CLASSES = 5
ONE = torch.tensor([0.0, 0.0, 1.0, 1.0])


def boxlist(boxes: torch.Tensor, size: tuple[int, int], **fields) -> object:
    """A reference BoxList of inclusive `boxes` [N, 4] on an image of `size` (h, w)."""
    result = reference("structures.bounding_box").BoxList(boxes, (size[1], size[0]), mode="xyxy")
    for name, value in fields.items():
        result.add_field(name, value)
    return result


def random_inclusive_boxes(g: torch.Generator, n: int, size: tuple[int, int], low: float = 4, high: float = 120) -> torch.Tensor:
    """Boxes of 4 to 120 pixels, some reaching outside the image."""
    wh = low + (high - low) * torch.rand(n, 2, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([size[1] + 20.0, size[0] + 20.0]) - 20
    return torch.cat([xy, xy + wh - 1], dim=1)


def star(rng: np.random.Generator, centre, low: float, high: float, n: int) -> np.ndarray:
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radius = rng.uniform(low, high, n)
    return (np.asarray(centre) + np.stack([np.cos(angles), np.sin(angles)], 1) * radius[:, None]).astype(np.float32)


def ground_truth(seed: int):
    """Per image: instances of polygons (a small star, two overlapping parts, two disjoint parts, a big one)
    with their inclusive boxes (the reference's, from the polygons' extents) and labels."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in SIZES:
        instances = []
        for kind in range(4):
            centre = rng.uniform([20, 20], [w - 20, h - 20])
            if kind == 0:
                parts = [star(rng, centre, 3, 12, 7)]
            elif kind == 1:
                first = star(rng, centre, 8, 25, 12)
                parts = [first, first + rng.uniform(-8, 8, 2).astype(np.float32)]
            elif kind == 2:
                parts = [star(rng, centre - [15, 0], 4, 10, 6), star(rng, centre + [15, 0], 4, 10, 6)]
            else:
                parts = [star(rng, centre, 20, 45, 24)]
            parts = [np.clip(p, 0, [w - 1, h - 1]).astype(np.float32) for p in parts]
            instances.append(parts)
        boxes = [np.concatenate([np.concatenate(p).min(0), np.concatenate(p).max(0)]) for p in instances]
        labels = [int(rng.integers(1, NUM_CLASSES)) for _ in instances]
        images.append((instances, torch.tensor(np.array(boxes), dtype=torch.float32), labels))
    return images


def reference_targets(images) -> list:
    segmentation = reference("structures.segmentation_mask")
    targets = []
    for (instances, boxes, labels), size in zip(images, SIZES):
        polygons = [[p.flatten().tolist() for p in parts] for parts in instances]
        masks = segmentation.SegmentationMask(polygons, (size[1], size[0]))
        targets.append(boxlist(boxes, size, labels=torch.tensor(labels), masks=masks))
    return targets


def our_batch(images):
    batch = batch_from(
        torch.zeros(len(images), 3, H, W, dtype=torch.uint8),
        [(boxes + ONE).tolist() for _, boxes, _ in images],
        [labels for _, _, labels in images],
        [[[p.tolist() for p in parts] for parts in instances] for instances, _, _ in images],
    )
    batch.image_sizes = torch.tensor(SIZES, dtype=torch.int32)
    return batch


class Recorded:
    """A reference sampler that remembers its draws (masks of positives and negatives per image) and the labels."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.labels = None
        self.draw = None

    def __call__(self, labels):
        self.labels = [label.clone() for label in labels]
        self.draw = self.sampler(labels)
        return self.draw


def inject_samples(monkeypatch, module, recorded: Recorded, num_candidates: list[int]) -> None:
    """Make `module.sample_balanced` return the reference's draw in our layout (positives, negatives, padding).

    It also checks that our labels are the reference's on every real candidate (1/0/-1 against
    the reference's class > 0 / 0 / -1), which compares matching, thresholds and straddle rules.
    """

    def sample(label, num_samples, positive_fraction, generator=None):
        slots = min(num_samples, label.shape[1])
        index = torch.zeros(label.shape[0], slots, dtype=torch.int64)
        is_positive = torch.zeros(label.shape[0], slots, dtype=torch.bool)
        valid = torch.zeros(label.shape[0], slots, dtype=torch.bool)
        for i, (positives, negatives) in enumerate(zip(*recorded.draw)):
            theirs = recorded.labels[i]
            ours = label[i, : num_candidates[i]]
            expected = torch.where(theirs > 0, 1, torch.where(theirs == 0, 0, -1))
            assert torch.equal(ours, expected.to(ours.dtype)), f"image {i}: our labels differ from the reference's"
            chosen = torch.cat([positives.nonzero().flatten(), negatives.nonzero().flatten()])
            index[i, : len(chosen)] = chosen
            is_positive[i, : int(positives.sum())] = True
            valid[i, : len(chosen)] = True
        return index, is_positive, valid

    monkeypatch.setattr(module, "sample_balanced", sample)


# --------------------------------------------------------------------------------------------- backbone, anchors, coder, matcher


def test_frozen_batch_norm_folded_into_its_convolution_equals_the_references():
    """The reference's FrozenBatchNorm2d adds no epsilon to the variance (torchvision's adds 1e-5)."""
    body = build_model(model_config()).static_part.backbone.body
    conv, ours = body.layer1[0].conv2, body.layer1[0].bn2
    theirs = reference("layers").FrozenBatchNorm2d(ours.weight.numel())
    g = torch.Generator().manual_seed(10)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = torch.rand(ours.weight.numel(), generator=g) * (0.01 if name == "running_var" else 1.0)
        getattr(ours, name).copy_(value)
        getattr(theirs, name).copy_(value)
    x = torch.randn(1, conv.in_channels, 12, 12, generator=g)
    with torch.no_grad():
        expected = theirs(conv(x))
        difference = (conv_norm(conv, ours, x) - expected).norm() / expected.norm()
    assert ours.eps == 0 and difference < 1e-6, float(difference)  # an epsilon of 1e-5 here: about 5e-4


def test_anchors_and_their_visibility_on_a_padded_batch():
    generator = reference("modeling.rpn.anchor_generator").AnchorGenerator(ANCHOR_SIZES, RATIOS, STRIDES, straddle_thresh=0)
    image_list = reference("structures.image_list").ImageList(torch.zeros(2, 3, H, W), SIZES)
    grids = [(math.ceil(H / s), math.ceil(W / s)) for s in STRIDES]
    theirs = generator(image_list, [torch.zeros(2, 1, h, w) for h, w in grids])
    ours = Anchors(ANCHOR_SIZES, RATIOS, STRIDES, "reference")(grids, torch.device("cpu"))
    for level, level_anchors in enumerate(ours):
        assert torch.equal(inclusive_boxes(level_anchors), theirs[0][level].bbox)
    rpn = build_model(model_config(*TINY)).proposals
    visible = rpn.inside_image(torch.cat(ours), torch.tensor(SIZES))
    for i in range(2):
        expected = torch.cat([level.get_field("visibility") for level in theirs[i]]).bool()
        assert torch.equal(visible[i], expected)
    assert not visible[0].all() and visible[0].any()


def test_box_coder_encodes_and_decodes_as_the_reference():
    coder = reference("modeling.box_coder").BoxCoder((10.0, 10.0, 5.0, 5.0))
    g = torch.Generator().manual_seed(0)
    proposals = random_inclusive_boxes(g, 500, (H, W), low=1, high=300)
    gt = random_inclusive_boxes(g, 500, (H, W), low=1, high=300)
    torch.testing.assert_close(encode_boxes(gt + ONE, proposals + ONE, coder.weights), coder.encode(gt, proposals),
                               rtol=1e-5, atol=1e-5)
    deltas = torch.randn(500, 4 * 3, generator=g)
    deltas[:7, 2:4] = 9.0  # past the log(1000 / 16) clamp
    ours = decode_boxes(deltas, proposals + ONE, coder.weights)
    assert torch.equal(inclusive_boxes(ours).flatten(1), coder.decode(deltas, proposals))


@pytest.mark.parametrize("high, low, low_quality", [(0.7, 0.3, True), (0.5, 0.5, False)], ids=["rpn", "roi_heads"])
def test_matcher_labels_as_the_reference(high, low, low_quality):
    matcher = reference("modeling.matcher")
    g = torch.Generator().manual_seed(1)
    gt = random_inclusive_boxes(g, 6, (H, W))
    candidates = torch.cat([random_inclusive_boxes(g, 400, (H, W)), gt[:3]])  # exact copies: IoU 1, and ties
    iou = reference("structures.boxlist_ops").boxlist_iou(boxlist(gt, (H, W)), boxlist(candidates, (H, W)))
    expected = matcher.Matcher(high, low, allow_low_quality_matches=low_quality)(iou)
    padded = torch.cat([iou, torch.rand(2, iou.shape[1], generator=g)])[None]  # padding rows must not count
    gt_index, label = match_to_ground_truth(padded, torch.arange(8)[None] < 6, high, low, allow_low_quality=low_quality)
    assert torch.equal(label[0], torch.where(expected >= 0, 1, torch.where(expected == matcher.Matcher.BELOW_LOW_THRESHOLD, 0, -1)))
    assert torch.equal(gt_index[0][expected >= 0], expected[expected >= 0])


@pytest.mark.parametrize("positives, negatives", [(3, 1000), (300, 1000), (200, 20), (0, 5)])
def test_sampler_draws_as_many_of_each_class_as_the_reference(positives, negatives):
    sampler = reference("modeling.balanced_positive_negative_sampler").BalancedPositiveNegativeSampler(512, 0.25)
    g = torch.Generator().manual_seed(2)
    label = torch.full((1, positives + negatives + 50), -1, dtype=torch.int64)
    order = torch.randperm(label.shape[1], generator=g)
    label[0, order[:positives]] = 1
    label[0, order[positives : positives + negatives]] = 0
    (their_pos,), (their_neg,) = sampler([label[0]])
    index, is_positive, valid = sample_balanced(label, 512, 0.25, generator=g)
    assert int(is_positive.sum()) == int(their_pos.sum())
    assert int((valid & ~is_positive).sum()) == int(their_neg.sum())
    assert label[0, index[0][is_positive[0]]].eq(1).all() and label[0, index[0][valid[0] & ~is_positive[0]]].eq(0).all()


# --------------------------------------------------------------------------------------------- levels and pooling


def test_level_mapper_as_the_reference_including_the_boundaries():
    g = torch.Generator().manual_seed(3)
    boxes = random_inclusive_boxes(g, 300, (800, 1344), low=1, high=800)
    exact = torch.tensor([[0.0, 0.0, s - 1, s - 1] for s in (56, 112, 224, 448, 895, 896, 897, 111, 113)])
    boxes = torch.cat([boxes, exact])
    theirs = reference("modeling.poolers").LevelMapper(2, 5)([boxlist(boxes, (800, 1344))])
    ours = MultiLevelRoIAlign(7, 2, STRIDES[:4], canonical_scale=224, canonical_level=4, inclusive=True).levels(boxes)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("sync_free", [False, True], ids=["per-level", "sync-free"])
def test_pooled_features_equal_the_references(sync_free):
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(2, 8, math.ceil(H / s), math.ceil(W / s), generator=g) for s in STRIDES[:4]]
    boxes = [random_inclusive_boxes(g, 60, size, low=2, high=160) for size in SIZES]
    boxes[0][:4] = torch.tensor([[0.0, 0.0, 15.0, 15.0], [100.0, 70.0, 131.0, 101.0], [5.0, 5.0, 5.0, 5.0], [129, 95, 129, 95]])
    pooler = reference("modeling.poolers").Pooler((7, 7), POOLER_SCALES, 2)
    theirs = pooler(features, [boxlist(b, size) for b, size in zip(boxes, SIZES)])
    ours = MultiLevelRoIAlign(7, 2, STRIDES[:4], canonical_scale=224, canonical_level=4, inclusive=True)
    pooled = ours(features, boxes_to_rois(torch.stack(boxes)), sync_free)
    difference = (pooled - theirs).norm() / theirs.norm()
    assert difference <= 1e-4, float(difference)


# --------------------------------------------------------------------------------------------- proposals


@pytest.mark.parametrize("training", [True, False], ids=["training", "testing"])
def test_proposals_on_a_padded_batch_are_the_references(training):
    """Anchors over the padding decode to boxes outside the smaller image: clipped to 1-pixel strips
    at its edge, which NMS merges, as in the reference (not zero-width boxes that all survive)."""
    pre_nms, post_nms = 400, 300
    config = model_config(
        *TINY,
        f"model.rpn.pre_nms_top_n_train={pre_nms}",
        f"model.rpn.pre_nms_top_n_test={pre_nms}",
        f"model.rpn.post_nms_top_n_train={post_nms}",
        f"model.rpn.post_nms_top_n_test={post_nms}",
    )
    rpn = build_model(config).proposals.train(training)
    g = torch.Generator().manual_seed(5)
    grids = [(math.ceil(H / s), math.ceil(W / s)) for s in STRIDES]
    objectness = [torch.randn(2, 3, h, w, generator=g) for h, w in grids]
    deltas = [0.3 * torch.randn(2, 12, h, w, generator=g) for h, w in grids]
    anchors = rpn.anchors(grids, torch.device("cpu"))
    flat_objectness, flat_deltas = flatten_head_outputs(objectness, deltas)
    ours, valid = rpn.propose(flat_objectness, flat_deltas, anchors, torch.tensor(SIZES), sync_free=False)

    inference = reference("modeling.rpn.inference")
    post_processor = inference.RPNPostProcessor(
        pre_nms_top_n=pre_nms,
        post_nms_top_n=pre_nms,  # the reference's per-level cap equals the pre-NMS count (2000, or 1000 testing)
        nms_thresh=0.7,
        min_size=0,
        fpn_post_nms_top_n=post_nms * 2 if training else post_nms,  # over the batch in training, per image testing
    ).train(training)
    generator = reference("modeling.rpn.anchor_generator").AnchorGenerator(ANCHOR_SIZES, RATIOS, STRIDES)
    image_list = reference("structures.image_list").ImageList(torch.zeros(2, 3, H, W), SIZES)
    theirs = post_processor(generator(image_list, objectness), objectness, deltas)
    for i in range(2):
        mine = inclusive_boxes(ours[i][valid[i]])
        expected = theirs[i].bbox
        assert len(mine) == len(expected)
        assert torch.equal(mine[by_box(mine)], expected[by_box(expected)])
    strips = inclusive_boxes(ours[0][valid[0]])
    assert (strips[:, 0] == SIZES[0][1] - 1).any(), "a proposal clipped to the right edge's strip"


# --------------------------------------------------------------------------------------------- losses


def test_rpn_losses_equal_the_references(monkeypatch):
    rpn = build_model(model_config(*TINY)).proposals.train()
    g = torch.Generator().manual_seed(6)
    grids = [(math.ceil(H / s), math.ceil(W / s)) for s in STRIDES]
    objectness = [torch.randn(2, 3, h, w, generator=g) for h, w in grids]
    deltas = [0.3 * torch.randn(2, 12, h, w, generator=g) for h, w in grids]
    images = ground_truth(seed=6)
    targets = reference_targets(images)
    batch = our_batch(images)

    box_coder = reference("modeling.box_coder").BoxCoder((1.0, 1.0, 1.0, 1.0))
    sampler = Recorded(reference("modeling.balanced_positive_negative_sampler").BalancedPositiveNegativeSampler(256, 0.5))
    rpn_loss = reference("modeling.rpn.loss")
    matcher = reference("modeling.matcher").Matcher(0.7, 0.3, allow_low_quality_matches=True)
    loss = rpn_loss.RPNLossComputation(matcher, sampler, box_coder, rpn_loss.generate_rpn_labels)
    generator = reference("modeling.rpn.anchor_generator").AnchorGenerator(ANCHOR_SIZES, RATIOS, STRIDES, straddle_thresh=0)
    image_list = reference("structures.image_list").ImageList(torch.zeros(2, 3, H, W), SIZES)
    their_objectness, their_box = loss(generator(image_list, objectness), objectness, deltas, targets)

    anchors = rpn.anchors(grids, torch.device("cpu"))
    inject_samples(monkeypatch, model.rpn, sampler, [sum(len(a) for a in anchors)] * 2)
    gt_valid = torch.arange(batch.boxes.shape[1])[None] < batch.num_boxes[:, None]
    ours = rpn.losses(*flatten_head_outputs(objectness, deltas), anchors, batch.image_sizes, batch.boxes, gt_valid)
    torch.testing.assert_close(ours["loss_objectness"], their_objectness, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours["loss_rpn_box_reg"], their_box, rtol=1e-5, atol=1e-7)


def roi_setup(seed: int):
    """Tiny heads, random P2-P5 features, the ground truth, and proposals around it (inclusive, per image)."""
    torch.manual_seed(seed)
    net = build_model(model_config(*TINY, "model.roi_heads.batch_size_per_image=64"), num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, 32, math.ceil(H / s), math.ceil(W / s), generator=g) for s in STRIDES[:4]]
    images = ground_truth(seed)
    proposals = []
    for (_, boxes, _), size in zip(images, SIZES):
        jittered = boxes.repeat(6, 1) + 4 * torch.randn(len(boxes) * 6, 4, generator=g)
        jittered[:, 2:] = torch.maximum(jittered[:, 2:], jittered[:, :2] + 1)
        proposals.append(torch.cat([jittered, random_inclusive_boxes(g, 40, size)]))
    return net.roi_heads, features, images, proposals


def test_box_and_mask_losses_equal_the_references(monkeypatch):
    heads, features, images, proposals = roi_setup(seed=7)
    heads.train()
    targets = reference_targets(images)
    batch = our_batch(images)
    gt_valid = torch.arange(batch.boxes.shape[1])[None] < batch.num_boxes[:, None]

    # The reference: proposals with the ground truth appended (its RPN does that), sampled, pooled by its
    # Pooler, through our head modules (the same weights), into its loss computations.
    box_loss_module = reference("modeling.roi_heads.box_head.loss")
    mask_loss_module = reference("modeling.roi_heads.mask_head.loss")
    matcher = reference("modeling.matcher").Matcher(0.5, 0.5, allow_low_quality_matches=False)
    sampler = Recorded(reference("modeling.balanced_positive_negative_sampler").BalancedPositiveNegativeSampler(64, 0.25))
    box_loss = box_loss_module.FastRCNNLossComputation(matcher, sampler, reference("modeling.box_coder").BoxCoder((10.0, 10.0, 5.0, 5.0)))
    candidates = [boxlist(torch.cat([p, t.bbox]), size) for p, t, size in zip(proposals, targets, SIZES)]
    sampled = box_loss.subsample(candidates, targets)
    poolers = reference("modeling.poolers")
    pooled = poolers.Pooler((7, 7), POOLER_SCALES, 2)(features, sampled)
    class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
    their_classifier, their_box_reg = box_loss([class_logits], [box_regression])
    positives = [p[p.get_field("labels") > 0] for p in sampled]
    mask_logits = heads.mask_predictor(heads.mask_head(poolers.Pooler((14, 14), POOLER_SCALES, 2)(features, positives)))
    their_mask = mask_loss_module.MaskRCNNLossComputation(matcher, 28)(positives, mask_logits, targets)

    inject_samples(monkeypatch, model.roi_heads, sampler, [len(c) for c in candidates])
    ours = heads.losses(
        features, torch.stack(proposals) + ONE, torch.ones(2, len(proposals[0]), dtype=torch.bool),
        batch.boxes, batch.labels, gt_valid, batch.verts, batch.polys, batch.num_polys,
    )  # fmt: skip
    assert sum(len(p) for p in positives) > 10
    torch.testing.assert_close(ours["loss_classifier"], their_classifier, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss_box_reg"], their_box_reg, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["loss_mask"], their_mask, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def test_box_and_mask_inference_equal_the_references():
    heads, features, _, proposals = roi_setup(seed=8)
    heads.eval()
    with torch.no_grad():  # class scores above the 0.05 threshold for a few classes
        heads.box_predictor.cls_score.bias.copy_(torch.tensor([-2.0, 1.0, 0.5, 0.0, -0.5]))
    ours = heads.detect(features, torch.stack(proposals) + ONE, torch.ones(2, len(proposals[0]), dtype=torch.bool),
                        torch.tensor(SIZES))

    poolers = reference("modeling.poolers")
    proposal_lists = [boxlist(p, size) for p, size in zip(proposals, SIZES)]
    class_logits, box_regression = heads.box_predictor(heads.box_head(poolers.Pooler((7, 7), POOLER_SCALES, 2)(features, proposal_lists)))
    post_processor = reference("modeling.roi_heads.box_head.inference").PostProcessor(
        score_thresh=0.05, nms=0.5, detections_per_img=100, box_coder=reference("modeling.box_coder").BoxCoder((10.0, 10.0, 5.0, 5.0))
    )
    detections = post_processor((class_logits, box_regression), proposal_lists)
    mask_logits = heads.mask_predictor(heads.mask_head(poolers.Pooler((14, 14), POOLER_SCALES, 2)(features, detections)))
    detections = reference("modeling.roi_heads.mask_head.inference").MaskPostProcessor()(mask_logits, detections)
    for i, theirs in enumerate(detections):
        n = int(ours.num_detections[i])
        assert n == len(theirs) > 10
        # Rows in one order on both sides: by score, then box (proposals outside the features tie on score).
        mine = (ours.scores[i, :n], ours.labels[i, :n], inclusive_boxes(ours.boxes[i, :n]), ours.mask_probs[i, :n])
        expected = (theirs.get_field("scores"), theirs.get_field("labels"), theirs.bbox, theirs.get_field("mask")[:, 0])
        mine, expected = (tuple(a[by_score_then_box(rows[0], rows[2])] for a in rows) for rows in (mine, expected))
        torch.testing.assert_close(mine[0], expected[0], rtol=0, atol=1e-6)
        assert torch.equal(mine[1], expected[1])
        torch.testing.assert_close(mine[2], expected[2], rtol=0, atol=1e-4)
        torch.testing.assert_close(mine[3], expected[3], rtol=0, atol=1e-5)


def by_box(boxes: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.lexsort([boxes[:, k].numpy() for k in (3, 2, 1, 0)]))


def by_score_then_box(scores: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    keys = [boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -scores.double().round(decimals=6)]
    return torch.from_numpy(np.lexsort([k.numpy() for k in keys]))


# --------------------------------------------------------------------------------------------- mask targets


@pytest.mark.parametrize("sync_free", [False, True], ids=["own-instance", "every-edge"])
def test_mask_targets_equal_the_references(sync_free):
    """Small, multi-part and overlapping instances, proposals partly off their object or far from it."""
    images = ground_truth(seed=9)
    targets = reference_targets(images)
    batch = our_batch(images)
    g = torch.Generator().manual_seed(9)
    boxes, owners = [], []
    for _, gt, _ in images:
        owner = torch.arange(len(gt)).repeat(16)
        scale = torch.tensor([0.5, 2.0, 8.0, 30.0]).repeat_interleave(len(gt) * 4)[:, None]
        box = gt[owner] + scale * torch.randn(len(owner), 4, generator=g)
        boxes.append(torch.cat([box[:, :2], torch.maximum(box[:, 2:], box[:, :2] + 0.5)], dim=1))
        owners.append(owner)
    ours = polygon_mask_targets(torch.stack(boxes), torch.stack(owners), batch.verts, batch.polys, batch.num_polys, 28, sync_free)
    project = reference("modeling.roi_heads.mask_head.loss").project_masks_on_boxes
    for i, target in enumerate(targets):
        theirs = project(target.get_field("masks")[owners[i]], boxlist(boxes[i], SIZES[i]), 28)
        assert torch.equal(ours[i], theirs)
        assert theirs.sum() > 0
