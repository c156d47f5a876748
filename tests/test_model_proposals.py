"""Training proposals at the reference's scale against torchvision's NMS and the reference's batch-wide top-k.

Realistic RPN outputs: a few dozen objects in an 800x1344 image; every anchor's objectness
grows with its best IoU with an object (plus noise), and its deltas move it most of the way to
that object (plus noise), so each level's top 2000 are dense clusters around the objects with
long chains of overlaps, as a trained RPN produces.
"""

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, nms

from model import build_model
from model.box_ops import padded_nms
from tests.model_helpers import model_config

H, W = 800, 1344  # the reference's landscape bucket
GRIDS = [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)]
CODER = BoxCoder((1.0, 1.0, 1.0, 1.0))


def random_objects(generator: torch.Generator, n: int) -> torch.Tensor:
    log_wh = torch.empty(n, 2).uniform_(torch.log(torch.tensor(16.0)), torch.log(torch.tensor(500.0)), generator=generator)
    wh = torch.exp(log_wh)  # 16 to 500 pixels, log-uniform
    xy = torch.rand(n, 2, generator=generator) * (torch.tensor([W, H]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def rpn_outputs(anchors: list[torch.Tensor], objects: list[torch.Tensor], generator: torch.Generator):
    """Per level: objectness [B, A] logits and deltas [B, A, 4], realistic for `objects` per image."""
    objectness, deltas = [], []
    for level_anchors in anchors:
        level_obj, level_deltas = [], []
        for image_objects in objects:
            iou = box_iou(image_objects, level_anchors)
            best_iou, best = iou.max(dim=0)
            logits = 12.0 * best_iou - 4.0 + torch.randn(best_iou.shape, generator=generator)
            target = CODER.encode_single(image_objects[best], level_anchors)
            noise = 0.15 * torch.randn(target.shape, generator=generator)
            level_obj.append(logits)
            level_deltas.append(0.8 * target * (best_iou > 0.1)[:, None] + noise)
        objectness.append(torch.stack(level_obj))
        deltas.append(torch.stack(level_deltas))
    return objectness, deltas


def inclusive_clip(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The reference's clip_to_image on its inclusive boxes (every coordinate to [0, W - 1]), in continuous terms."""
    inclusive = clip_boxes_to_image(boxes - torch.tensor([0.0, 0.0, 1.0, 1.0]), (h - 1, w - 1))
    return inclusive + torch.tensor([0.0, 0.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def reference_rpn():
    return build_model(model_config()).proposals.train()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_iteration_nms_equals_greedy_nms_on_dense_rpn_proposals(reference_rpn, seed):
    """The sync-free NMS (a fixed number of Cluster-NMS steps) keeps exactly greedy NMS's boxes at IoU 0.7."""
    generator = torch.Generator().manual_seed(seed)
    anchors = reference_rpn.anchors(GRIDS, torch.device("cpu"))[:2]  # P2 and P3: the densest levels
    objects = [random_objects(generator, 40)]
    objectness, deltas = rpn_outputs(anchors, objects, generator)
    for level_obj, level_deltas, level_anchors in zip(objectness, deltas, anchors):
        scores, top = level_obj[0].topk(2000)
        boxes = clip_boxes_to_image(CODER.decode_single(level_deltas[0][top], level_anchors[top]), (H, W))
        valid = torch.ones(1, 2000, dtype=torch.bool)
        keep = padded_nms(boxes[None], valid, 0.7, sync_free=True)[0]
        expected = torch.zeros(2000, dtype=torch.bool)
        expected[nms(boxes, scores, 0.7)] = True
        assert 0 < int(expected.sum()) < 1500  # dense: NMS removes many
        assert torch.equal(keep, expected)


@pytest.mark.parametrize("sync_free", [False, True])
def test_training_proposals_at_reference_scale_equal_the_reference_postprocessor(reference_rpn, sync_free):
    """2000 per level before NMS, NMS 0.7 per level, then the top 1000 x B over the whole batch.

    Independent computation, as maskrcnn-benchmark's RPNPostProcessor in training: per image
    and level the top 2000 by objectness, decoded (torchvision's BoxCoder), clipped as its
    inclusive boxes are (`inclusive_clip`), NMS per
    level (torchvision's batched_nms with the level as the class) keeping every survivor;
    then `select_over_all_levels`: the top fpn_post_nms_top_n over the concatenated
    objectness of all images (1000 x 2 here: images per GPU x 1000).
    """
    generator = torch.Generator().manual_seed(7)
    batch = 2
    anchors = reference_rpn.anchors(GRIDS, torch.device("cpu"))
    objects = [random_objects(generator, 60), random_objects(generator, 8)]  # image 0 is busier
    objectness, deltas = rpn_outputs(anchors, objects, generator)
    sizes = torch.tensor([[H, W], [H - 40, W - 100]], dtype=torch.int32)  # image 1 was padded

    proposals, valid = reference_rpn.propose(objectness, deltas, anchors, sizes, sync_free)

    survivors = []  # per image: (scores, boxes) after per-level NMS
    for i in range(batch):
        scores, boxes, levels = [], [], []
        for level, (obj, delta, level_anchors) in enumerate(zip(objectness, deltas, anchors)):
            top_obj, top = obj[i].topk(min(2000, obj.shape[1]))
            decoded = CODER.decode_single(delta[i][top], level_anchors[top])
            scores.append(top_obj.sigmoid())
            boxes.append(inclusive_clip(decoded, *sizes[i].tolist()))
            levels.append(torch.full((top.numel(),), level))
        scores, boxes, levels = torch.cat(scores), torch.cat(boxes), torch.cat(levels)
        keep = batched_nms(boxes, scores, levels, 0.7)
        survivors.append((scores[keep], boxes[keep]))
    all_scores = torch.cat([s for s, _ in survivors])
    top = all_scores.topk(1000 * batch).indices
    in_top = torch.zeros_like(all_scores, dtype=torch.bool)
    in_top[top] = True
    in_top = in_top.split([s.numel() for s, _ in survivors])

    assert int(valid.sum()) == 1000 * batch
    assert int(valid[0].sum()) > int(valid[1].sum())  # the batch-wide top-k favours the busier image
    for i, (scores, boxes) in enumerate(survivors):
        expected = boxes[in_top[i]][scores[in_top[i]].argsort(descending=True)]
        assert int(valid[i].sum()) == expected.shape[0]
        torch.testing.assert_close(proposals[i][valid[i]], expected, rtol=0, atol=1e-3)
