"""Solver: parameter groups, the schedule as a pure function, and the MLPerf rules."""

from pathlib import Path

import pytest
import torch
from torch import nn

from train.config import load_config
from train.solver import (
    build_optimizer,
    closed_division_violations,
    lr_multiple,
    lr_multiplier,
    mlperf_lr_and_steps,
    parameter_groups,
    set_learning_rate,
)

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 2)


def test_parameter_groups_follow_the_reference():
    net = TinyNet()
    groups = parameter_groups(net, base_lr=0.02, weight_decay=1e-4, weight_decay_bias=0.0, bias_lr_factor=2.0)
    weights, biases = groups
    assert [p is net.head.weight for p in weights["params"]] == [True]
    assert [p is net.head.bias for p in biases["params"]] == [True]
    assert (weights["lr"], weights["weight_decay"]) == (0.02, 1e-4)
    assert (biases["lr"], biases["weight_decay"]) == (0.04, 0.0)


@pytest.mark.parametrize(
    "iteration, expected",
    [
        (0, 1 / 3),  # warmup starts at warmup_factor
        (250, 1 / 3 * 0.5 + 0.5),  # halfway: alpha = 0.5
        (499, 1 / 3 * (1 - 499 / 500) + 499 / 500),
        (500, 1.0),
        (59999, 1.0),
        (60000, 0.1),  # decay applies from the step itself on
        (80000, 0.01),
        (89999, 0.01),
    ],
)
def test_schedule_by_hand(iteration, expected):
    got = lr_multiplier(iteration, warmup_iters=500, warmup_factor=1 / 3, steps=(60000, 80000), gamma=0.1)
    assert got == pytest.approx(expected, rel=1e-12)


def test_set_learning_rate_scales_each_group():
    cfg = load_config(REFERENCE)
    optimizer, _ = build_optimizer(TinyNet(), cfg.solver, torch.device("cpu"))
    lr = set_learning_rate(optimizer, cfg.solver, 60000)
    assert lr == pytest.approx(0.002)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.002, 0.004])


@pytest.mark.parametrize(
    "batch, k, lr, steps",
    [
        (16, 1, 0.02, (66000, 88000)),  # (60000, 80000) x 1.1
        (96, 6, 0.12, (16000, 21333)),  # x 1.6 x 16/96; 21333.33 rounds to 21333
        (8, 2, 0.01, (144000, 192000)),  # below batch 16 the LR is 0.02 / K
        (256, 12, 0.24, (8250, 11000)),  # x 2.2 x 1/16
    ],
)
def test_mlperf_rule_helper(batch, k, lr, steps):
    got_lr, got_steps = mlperf_lr_and_steps(batch, k)
    assert got_lr == pytest.approx(lr)
    assert got_steps == steps
    assert lr_multiple(got_lr, batch) == k


def test_cpu_optimizer_is_foreach_sgd():
    cfg = load_config(REFERENCE)
    optimizer, name = build_optimizer(TinyNet(), cfg.solver, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD) and name == "torch.optim.SGD(foreach=True)"
    assert optimizer.defaults["momentum"] == 0.9


def test_closed_division_check_names_what_breaks():
    reference = load_config(REFERENCE, ["train.weights=R-50.pkl", "solver.steps=[66000, 88000]"])
    assert closed_division_violations(reference) == []
    broken = load_config(
        REFERENCE,
        ["train.weights=R-50.pkl", "solver.base_lr=0.03", "model.backbone.norm=bn", "solver.momentum=0.8"],
    )
    problems = closed_division_violations(broken)
    assert any("solver.base_lr=0.03" in p for p in problems)
    assert any(p.startswith("model.backbone.norm='bn'") for p in problems)
    assert any(p.startswith("solver.momentum=0.8") for p in problems)
    scaled = load_config(
        REFERENCE, ["train.weights=R-50.pkl", "solver.ims_per_batch=96", "solver.base_lr=0.12", "solver.steps=[16000, 21333]"]
    )
    assert closed_division_violations(scaled) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_optimizer_steps_like_the_plain_one():
    torch.manual_seed(0)
    nets = [TinyNet().cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused, _ = build_optimizer(nets[0], load_config(REFERENCE, ["solver.optimizer=auto"]).solver, torch.device("cuda"))
    plain, _ = build_optimizer(nets[1], load_config(REFERENCE, ["solver.optimizer=plain"]).solver, torch.device("cuda"))
    x = torch.randn(8, 3, device="cuda")
    for _ in range(5):
        for net, opt in ((nets[0], fused), (nets[1], plain)):
            opt.zero_grad()
            net.head(net.frozen(x)).square().sum().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
