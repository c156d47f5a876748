"""GPU-only trainer checks: the graphed, bulk-readback step makes no host synchronization."""

from pathlib import Path

import pytest
import torch

from model import build_model
from model.synthetic_batch import synthetic_batch
from train.config import load_config
from train.engine import LossReadback, TrainingStep, make_grad_scaler, step_autocast
from train.solver import build_optimizer, set_learning_rate

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_graphed_step_runs_without_host_sync(precision):
    cfg = load_config(DEMO, ["model.backbone.norm=frozen_bn", "model.backbone.freeze_at=2"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5).to(device).to(memory_format=torch.channels_last)
    model.train()
    optimizer, name = build_optimizer(model, cfg.solver, device)
    assert "fused" in name.lower() or "apex" in name.lower()
    autocast = step_autocast(precision, device, cuda_graphs=True)
    step = TrainingStep(model, optimizer, make_grad_scaler(precision, device), autocast, device)
    batch = synthetic_batch(4, (128, 160), 5, 6, device=device)
    model.static_part.capture([(128, 160)], 4, autocast)
    assert model.static_part.captured
    readback = LossReadback()
    for iteration in range(3):  # warm-up: allocator growth, lazy inits
        set_learning_rate(optimizer, cfg.solver, iteration)
        readback.add(iteration, step(batch), 0.0)
    readback.flush()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for iteration in range(3, 8):
            readback.add(iteration, step(batch), 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    steps = readback.flush()
    assert len(steps) == 5 and all(torch.isfinite(torch.tensor(s.total)) for s in steps)
