"""Training-side behaviour: sync-free pieces against torchvision and hand-worked cases, losses
under bf16 autocast, a few optimizer steps on one batch driving the loss down, the frozen-BN
fold, and (on fake CUDA tensors, no GPU needed) a training forward free of host synchronization."""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import FrozenBatchNorm2d, box_iou, nms

from model import build_model
from model.backbone import conv_norm
from model.box_ops import padded_nms
from model.losses import box_head_losses
from model.rpn import in_top_n_of_batch
from model.sampling import match_to_ground_truth, sample_balanced
from model.synthetic import synthetic_batch
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
