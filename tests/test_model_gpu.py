"""GPU-only model checks: CUDA-graph capture of the static part, evaluation after capture, no host
synchronization in the training step, AMP steps, and device mask targets against the CPU ones."""

import contextlib
import functools

import pytest
import torch

from model import build_model
from model.mask_targets import polygon_mask_targets
from model.synthetic_batch import synthetic_batch
from tests.model_helpers import TINY, model_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SIZE = (256, 320)


def cuda_model(*overrides: str):
    torch.manual_seed(0)
    return build_model(model_config(*TINY, *overrides), num_classes=5).cuda().train()


def test_graphed_static_part_matches_eager_outputs_and_gradients():
    model = cuda_model("model.backbone.norm=frozen_bn", "model.backbone.freeze_at=2")
    images = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8, device="cuda")
    images = images.contiguous(memory_format=torch.channels_last)
    sizes = torch.tensor([[SIZE[0], SIZE[1]], [SIZE[0] - 40, SIZE[1] - 56]], dtype=torch.int32, device="cuda")
    params = [p for p in model.static_part.parameters() if p.requires_grad]

    def outputs_and_grads():
        outputs = model.static_part(images, sizes)
        weights = [torch.linspace(0, 1, o.numel(), device="cuda").view_as(o) for o in outputs]
        loss = sum((o.float() * w).sum() for o, w in zip(outputs, weights))
        grads = torch.autograd.grad(loss, params)
        return [o.detach().clone() for o in outputs], grads

    eager_outputs, eager_grads = outputs_and_grads()
    model.static_part.capture([SIZE], len(images), contextlib.nullcontext)  # fp32
    graph_outputs, graph_grads = outputs_and_grads()
    assert model.static_part.replays == 1
    # Same kernels either way; cuDNN may pick other algorithms, so allow rounding-level differences.
    for e, g in zip(eager_outputs + list(eager_grads), graph_outputs + list(graph_grads)):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4 * float(e.abs().max()))


def test_training_step_makes_no_host_synchronization():
    model = cuda_model()
    batch = synthetic_batch(2, SIZE, num_classes=5, max_gt=4, device="cuda", seed=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, foreach=True)

    def step():
        loss = sum(model(batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(2):  # warm-up: anchors, allocator, lazy initialization
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_steps_give_finite_losses(dtype):
    model = cuda_model()
    batch = synthetic_batch(2, SIZE, num_classes=5, max_gt=4, device="cuda", seed=1)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype):
            losses = model(batch)
        for name, value in losses.items():
            assert torch.isfinite(value), name
        optimizer.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()


def test_device_mask_targets_match_cpu():
    batch = synthetic_batch(4, (320, 320), num_classes=5, max_gt=6, seed=3)
    g = torch.Generator().manual_seed(4)
    instance = torch.randint(0, 6, (4, 64), generator=g)
    centre = batch.boxes.gather(1, instance[..., None].expand(-1, -1, 4))
    boxes = centre + torch.randn(4, 64, 4, generator=g) * 8
    cpu = polygon_mask_targets(boxes, instance, batch.verts, batch.polys, batch.num_polys, 28)
    gpu = polygon_mask_targets(
        boxes.cuda(), instance.cuda(), batch.verts.cuda(), batch.polys.cuda(), batch.num_polys.cuda(), 28, sync_free=True
    ).cpu()
    # The same float32 and float64 operations in the same order: the same bits (pycocotools' rasterization).
    assert torch.equal(cpu, gpu)
    assert cpu.sum() > 0


def test_evaluation_after_capture_runs_eagerly_under_the_training_autocast():
    """The training graph captured at the eval batch's shape; eval mode must not replay it."""
    model = cuda_model("model.backbone.norm=frozen_bn", "model.backbone.freeze_at=2")
    batch = synthetic_batch(2, SIZE, num_classes=5, max_gt=4, device="cuda", seed=2)
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16, cache_enabled=False)
    model.eval()
    with torch.inference_mode(), autocast():
        without_graphs = model(batch)  # before the capture (backward alone leaves the weights as they are)
    model.train()
    model.static_part.capture([SIZE], len(batch), autocast)
    with autocast():
        sum(model(batch).values()).backward()
    assert model.static_part.replays == 1
    model.eval()
    with torch.inference_mode(), autocast():
        after_capture = model(batch)
    assert model.static_part.replays == 1
    assert torch.equal(after_capture.num_detections, without_graphs.num_detections)
    torch.testing.assert_close(after_capture.boxes, without_graphs.boxes)
