"""GPU-only trainer checks: the graphed, bulk-readback step makes no host synchronization."""

from pathlib import Path

import pytest
import torch

from model import build_model
from model.synthetic_batch import synthetic_batch
from train.config import load_config
from train.engine import LossReadback, build_training_step
from train.solver import set_learning_rate

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_graphed_step_runs_without_host_sync(precision):
    # The demo's model: a trainable norm (GroupNorm), stable at its schedule's LR from random weights
    # (the frozen-BN reference turns to NaN within a few steps there).
    cfg = load_config(DEMO, [f"train.precision={precision}", "train.cuda_graphs=true"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5).to(device).to(memory_format=torch.channels_last)
    model.train()
    step = build_training_step(cfg, device, model)  # as the trainer builds it: fp16 gets torch's fused SGD and a scaler
    assert "fused" in step.optimizer_name.lower() or "apex" in step.optimizer_name.lower()
    batch = synthetic_batch(4, (128, 160), 5, 6, device=device)
    model.static_part.capture([(128, 160)], 4, step.autocast)
    assert model.static_part.captured
    readback = LossReadback()

    def loop_steps(iterations):  # the loop's host work around each step (train/engine.py train_one_epoch)
        for iteration in iterations:
            lr = set_learning_rate(step.optimizer, cfg.solver, iteration)
            scale_before = step.loss_scale()
            readback.add(iteration + 1, step(batch), lr, scale_before, step.loss_scale())

    loop_steps(range(3))  # warm-up: allocator growth, lazy inits
    readback.flush()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop_steps(range(3, 8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    steps = readback.flush()
    assert len(steps) == 5 and all(s.finite for s in steps), [s.losses for s in steps]
    assert model.static_part.replays == 8
