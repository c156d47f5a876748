"""Training-side behaviour: sync-free pieces against torchvision and hand-worked cases, losses
under bf16 autocast, a few optimizer steps on one batch driving the loss down, the frozen-BN
fold, and (on fake CUDA tensors, no GPU needed) a training forward free of host synchronization."""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, box_iou, nms

from model import build_model
from model.backbone import conv_norm
from model.box_ops import clip_boxes, decode_boxes, padded_nms
from model.losses import box_head_losses
from model.pooler import MultiLevelRoIAlign, boxes_to_rois
from model.rpn import in_top_n_of_batch
from model.matching import match_to_ground_truth, sample_balanced
from model.synthetic_batch import synthetic_batch
from tests.model_helpers import TINY, model_config

LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def random_boxes(generator: torch.Generator, n: int, size: float = 200.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * 60 + 4
    return torch.cat([xy, xy + wh], dim=1)


def test_sync_free_nms_equals_torchvision_nms():
    g = torch.Generator().manual_seed(0)
    boxes = torch.stack([random_boxes(g, 600) for _ in range(3)])  # clustered like RPN proposals
    scores = torch.rand(3, 600, generator=g)
    order = scores.argsort(dim=1, descending=True)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    valid = torch.rand(3, 600, generator=g) > 0.1
    for sync_free in (True, False):
        keep = padded_nms(boxes, valid, 0.5, sync_free=sync_free)
        for i in range(3):
            index = torch.where(valid[i])[0]
            expected = torch.zeros(600, dtype=torch.bool)
            expected[index[nms(boxes[i, index], -index.float(), 0.5)]] = True
            assert torch.equal(keep[i], expected)


def test_sync_free_nms_under_autocast_equals_torchvision_nms():
    # The suppression matrix is built in bfloat16 outside autocast; fp16 autocast must not touch it.
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(g, 2000, size=400.0)[None]  # dense: up to hundreds of suppressors per box
    valid = torch.ones(1, 2000, dtype=torch.bool)
    index = torch.arange(2000)
    expected = torch.zeros(1, 2000, dtype=torch.bool)
    expected[0, nms(boxes[0], -index.float(), 0.7)] = True
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert torch.equal(padded_nms(boxes, valid, 0.7, sync_free=True), expected)


def test_proposals_of_all_levels_in_one_nms_equal_per_level_torchvision_nms():
    # Levels of different sizes (the last one smaller than pre_nms_top_n) go through one padded call.
    g = torch.Generator().manual_seed(4)
    sizes = torch.tensor([[200, 300], [180, 260]], dtype=torch.int32)
    anchors = [random_boxes(g, n, size=250.0) for n in (400, 120, 37)]
    objectness = [torch.randn(2, a.shape[0], generator=g) for a in anchors]
    deltas = [0.1 * torch.randn(2, a.shape[0], 4, generator=g) for a in anchors]
    cfg = model_config(*TINY, "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=1000",
                       "model.rpn.post_nms_per_batch=false")
    rpn = build_model(cfg).proposals.train()
    boxes, valid = rpn.propose(objectness, deltas, anchors, sizes, sync_free=True)
    for i in range(2):
        expected = []
        for obj, delta, level_anchors in zip(objectness, deltas, anchors):
            top, index = obj[i].topk(min(100, obj.shape[1]))
            level_boxes = decode_boxes(delta[i, index], level_anchors[index], (1.0, 1.0, 1.0, 1.0)).squeeze(-2)
            level_boxes = clip_boxes(level_boxes[None], sizes[i : i + 1], inclusive=True)[0]
            kept = nms(level_boxes, top, 0.7)
            expected.append((torch.sigmoid(top[kept]), level_boxes[kept]))
        scores = torch.cat([s for s, _ in expected])
        order = scores.argsort(descending=True)
        assert torch.equal(boxes[i][valid[i]], torch.cat([b for _, b in expected])[order])


def test_sync_free_pooling_equals_torchvision_multiscale_roi_align():
    """Outputs and feature gradients, bit for bit, for RoIs of every level, degenerate ones and
    slivers at the far edges of a level (where roi_align's 1-pixel minimum reaches outside)."""
    g = torch.Generator().manual_seed(7)
    h, w = 512, 640
    features = [torch.randn(2, 4, h // s, w // s, generator=g, requires_grad=True) for s in (4, 8, 16, 32)]
    wh = 2 ** (2 + 7 * torch.rand(80, 2, generator=g))  # 4 to 512 pixels: every level
    xy = torch.rand(80, 2, generator=g) * torch.tensor([w, h])
    boxes = torch.cat([xy, xy + wh], dim=1).minimum(torch.tensor([w, h, w, h])).view(2, 40, 4)
    boxes[0, :4] = torch.tensor([[w, h, w, h], [10.0, h - 2.0, 40.0, h], [w - 1.0, 5.0, w, 300.0], [20.0, 0.0, w, h]])
    grad = torch.randn(80, 4, 7, 7, generator=g)
    ours = MultiLevelRoIAlign(7, 2, (4, 8, 16, 32), canonical_scale=224, canonical_level=4, inclusive=False)
    pooled = ours(features, boxes_to_rois(boxes), sync_free=True)
    ours_grads = torch.autograd.grad(pooled, features, grad)
    theirs = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = theirs(dict(zip("0123", features)), list(boxes), [(h, w)] * 2)
    theirs_grads = torch.autograd.grad(expected, features, grad)
    assert torch.equal(pooled, expected)
    for a, b in zip(ours_grads, theirs_grads):
        assert torch.equal(a, b)
    levels = ours.mapper([boxes_to_rois(boxes)[:, 1:]])
    assert set(levels.tolist()) == {0, 1, 2, 3}


def test_unsettled_sync_free_nms_keeps_a_superset(monkeypatch):
    # Cut the iteration short on a dense set: an even step count may keep extra boxes, never fewer.
    g = torch.Generator().manual_seed(5)
    boxes = random_boxes(g, 800, size=60.0)[None]
    valid = torch.ones(1, 800, dtype=torch.bool)
    exact = padded_nms(boxes, valid, 0.3, sync_free=False)
    monkeypatch.setattr("model.box_ops.SYNC_FREE_NMS_STEPS", 2)
    early = padded_nms(boxes, valid, 0.3, sync_free=True)
    assert (early | exact).equal(early) and early.sum() > exact.sum()


def test_matcher_equals_torchvision_matcher():
    g = torch.Generator().manual_seed(1)
    gt = random_boxes(g, 5)
    preds = random_boxes(g, 400)
    iou = box_iou(gt, preds)
    expected = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    padded = torch.cat([iou, torch.rand(3, 400, generator=g)])[None]  # 3 padding rows must not count
    gt_index, label = match_to_ground_truth(padded, torch.arange(8)[None] < 5, 0.7, 0.3, allow_low_quality=True)
    assert torch.equal(label[0], torch.where(expected >= 0, 1, torch.where(expected == -1, 0, -1)))
    positive = expected >= 0
    assert torch.equal(gt_index[0][positive], expected[positive])


def test_balanced_sampling_counts_by_hand():
    label = torch.zeros(3, 50, dtype=torch.int64)
    label[0, :10] = 1  # 10 positives, 40 negatives: 4 positives (25% of 16) and 12 negatives
    label[1, :2] = 1  # 2 positives: both, and 14 negatives
    label[2, :] = -1
    label[2, :3] = 1  # 3 positives, 5 negatives, the rest ignored: 3 + 5 and 8 padding slots
    label[2, 3:8] = 0
    index, is_positive, valid = sample_balanced(label, 16, 0.25)
    assert is_positive.sum(1).tolist() == [4, 2, 3]
    assert valid.sum(1).tolist() == [16, 16, 8]
    chosen = label.gather(1, index)
    assert torch.equal(chosen[is_positive], torch.ones(9, dtype=torch.int64))
    assert chosen[valid & ~is_positive].eq(0).all()
    for i in range(3):  # no anchor twice
        assert index[i][valid[i]].unique().numel() == int(valid[i].sum())


def test_balanced_sampling_at_the_random_draws_extremes(monkeypatch):
    """Every random draw at its largest value: a negative must never rank as a positive.

    The float32 keys this replaced (noise + 1.0 for negatives, noise + 2.0 for positives) took
    every negative whose noise lay within 2^-24 of 1 for a positive; torch.rand returns
    1 - 2^-24 with probability 2^-24 per anchor, about one wrong RPN positive in 70 images.
    Both draws are forced to their largest value here (torch.rand for the old keys,
    torch.randint for the integer keys).
    """
    largest_rand = 1.0 - 2.0**-24
    monkeypatch.setattr(torch, "rand", lambda *size, **kw: torch.full(size[0] if len(size) == 1 else size, largest_rand))
    monkeypatch.setattr(
        torch, "randint", lambda low, high, size, **kw: torch.full(size, high - 1, dtype=kw.get("dtype", torch.int64))
    )
    label = torch.zeros(2, 40, dtype=torch.int64)
    label[0, :3] = 1  # 3 positives, 37 negatives
    label[1, 5:] = -1  # no positive, 5 negatives
    index, is_positive, valid = sample_balanced(label, 16, 0.5)
    assert is_positive.sum(1).tolist() == [3, 0]
    assert valid.sum(1).tolist() == [16, 5]
    chosen = label.gather(1, index)
    assert chosen[is_positive].eq(1).all() and chosen[valid & ~is_positive].eq(0).all()


def test_balanced_sampling_is_uniform_within_each_class():
    # 4000 images alike: 10 positives (4 of 16 slots at 0.25) and 40 negatives (the other 12).
    label = torch.zeros(4000, 50, dtype=torch.int64)
    label[:, :10] = 1
    index, _, _ = sample_balanced(label, 16, 0.25, generator=torch.Generator().manual_seed(3))
    taken = torch.zeros_like(label, dtype=torch.float64).scatter(1, index, 1.0).mean(0)
    standard_error = (0.4 * 0.6 / 4000) ** 0.5
    assert (taken[:10] - 4 / 10).abs().max() < 5 * standard_error
    assert (taken[10:] - 12 / 40).abs().max() < 5 * standard_error


def test_post_nms_top_n_over_the_whole_batch_by_hand():
    # The reference keeps the top 3 proposals of the batch, not 3 per image (torchvision).
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.7, -1.0]])
    assert in_top_n_of_batch(scores, 3).tolist() == [[True, False, False], [True, True, False]]


def test_training_proposals_per_batch_vs_per_image_by_hand():
    # Six disjoint anchors (no NMS interplay); image 0 holds the four best scores of the batch.
    anchors = [torch.tensor([[40.0 * i, 0.0, 40.0 * i + 30, 30.0] for i in range(6)])]
    objectness = [torch.tensor([[5.0, 4.0, 3.0, 2.0, -5.0, -6.0], [1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])]
    deltas = [torch.zeros(2, 6, 4)]
    sizes = torch.tensor([[100, 300], [100, 300]], dtype=torch.int32)
    valid_counts = {}
    for per_batch in (True, False):
        flag = str(per_batch).lower()
        cfg = model_config(*TINY, "model.rpn.post_nms_top_n_train=2", f"model.rpn.post_nms_per_batch={flag}")
        rpn = build_model(cfg).proposals.train()
        boxes, valid = rpn.propose(objectness, deltas, anchors, sizes, sync_free=True)
        valid_counts[per_batch] = valid.sum(1).tolist()
        if per_batch:  # 2 per image x 2 images = the batch's best 4, all in image 0, best first
            assert torch.equal(boxes[0, :4][valid[0, :4]], anchors[0][:4])
    assert valid_counts == {True: [4, 0], False: [2, 2]}


def test_rpn_ignores_anchors_straddling_the_image_by_hand():
    model = build_model(model_config(*TINY))
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [-1.0, 10.0, 20.0, 20.0], [300.0, 10.0, 320.0, 100.0]])
    sizes = torch.tensor([[256, 320], [100, 310]], dtype=torch.int32)
    assert model.proposals.inside_image(anchors, sizes).tolist() == [[True, False, True], [True, False, False]]


def test_box_head_losses_equal_torchvision_fastrcnn_loss():
    # torchvision's loss fixes beta at 1/9 and counts every row; ours masks padding rows out.
    g = torch.Generator().manual_seed(6)
    logits, deltas = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 20, generator=g)
    labels = torch.randint(0, 5, (2, 7), generator=g)
    targets = torch.randn(2, 7, 4, generator=g) * (labels[..., None] > 0)
    sampled = torch.ones(2, 7, dtype=torch.bool)
    sampled[1, 5:] = False
    ours = box_head_losses(logits, deltas, labels, targets, sampled, beta=1 / 9)
    rows = sampled.flatten()
    theirs = fastrcnn_loss(
        logits.flatten(0, 1)[rows], deltas.flatten(0, 1)[rows], [labels.flatten()[rows]], [targets.flatten(0, 1)[rows]]
    )
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs))


def test_losses_finite_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model(model_config(*TINY), num_classes=4).train()
    batch = synthetic_batch(2, (128, 160), num_classes=4, max_gt=3, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert set(losses) == LOSSES
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_few_steps_on_one_batch_drive_the_loss_down():
    torch.manual_seed(0)
    model = build_model(model_config(*TINY), num_classes=4).train()
    batch = synthetic_batch(2, (96, 128), num_classes=4, max_gt=3, seed=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    totals = []
    for _ in range(6):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert totals[-1] < 0.8 * totals[0], totals


@pytest.mark.parametrize("kernel, stride, padding", [(1, 1, 0), (1, 2, 0), (3, 2, 1)])
def test_folded_frozen_bn_equals_conv_then_bn(kernel, stride, padding):
    """conv_norm's fold gives conv + FrozenBatchNorm2d's outputs and weight gradients."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, kernel, stride=stride, padding=padding, bias=False)
    norm = FrozenBatchNorm2d(16)
    norm.weight.copy_(1 + 0.5 * torch.randn(16, generator=generator))
    norm.bias.copy_(torch.randn(16, generator=generator))
    norm.running_mean.copy_(torch.randn(16, generator=generator))
    norm.running_var.copy_(0.5 + torch.rand(16, generator=generator))
    x = torch.randn(2, 8, 13, 17, generator=generator)
    grad = torch.randn_like(norm(conv(x)))

    expected = norm(conv(x))
    (expected_grad,) = torch.autograd.grad(expected, conv.weight, grad)
    folded = conv_norm(conv, norm, x)
    (folded_grad,) = torch.autograd.grad(folded, conv.weight, grad)
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded_grad, expected_grad, atol=1e-4, rtol=1e-5)


class DeviceToHostCopies(TorchDispatchMode):
    """Records every copy from a CUDA tensor into CPU memory (each one waits for the GPU)."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].is_cuda and out.device.type == "cpu":
            self.copies.append(str(func))
        if func is torch.ops.aten.copy_.default and args[1].is_cuda and args[0].device.type == "cpu":
            self.copies.append(str(func))
        return out


def test_cuda_training_forward_makes_no_host_synchronization_without_a_gpu():
    """The reference model's training forward at the reference bucket, on fake CUDA tensors.

    Fake tensors carry shapes and devices but no data, so every op whose output shape or Python
    value depends on the data (nonzero, boolean masks, where(cond), .item(), int(), bool()) raises
    here, as it would wait for the GPU on CUDA; copies to the CPU are recorded. The gpu-marked
    test checks the whole step, backward and optimizer included, with set_sync_debug_mode.
    """
    torch.manual_seed(0)
    model = build_model(model_config(), num_classes=81).train()
    batch = synthetic_batch(2, (800, 1344), num_classes=81, max_gt=8, seed=0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model, batch = model.to("cuda"), batch.to(torch.device("cuda"))
        with DeviceToHostCopies() as watch:
            losses = model(batch)
    assert set(losses) == LOSSES
    assert all(loss.is_cuda and loss.shape == () for loss in losses.values())
    assert watch.copies == []


def test_fake_cuda_tensors_catch_host_synchronization():
    """The check above is live: each kind of synchronizing op is caught."""
    with FakeTensorMode():
        x = torch.rand(10, device="cuda")
        for sync in (lambda: x[x > 0.5], lambda: torch.where(x > 0.5), lambda: int(x.sum()), lambda: bool(x.max() > 1)):
            with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
                sync()
        with DeviceToHostCopies() as watch:
            x.cpu()
    assert watch.copies == ["aten._to_copy.default"]
