"""The LR schedule beside the MLPerf reference's `WarmupMultiStepLR`, both warmup methods, both parameter groups.

The reference's scheduler runs on an optimizer with its two groups (weights at the base LR,
biases at twice it) and is stepped once per iteration; ours sets the same groups from the
config at each iteration. Every iteration of the warmup, and the iterations around each decay
step, must give the same LR to each group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from reference_oracle import reference, requires_reference
from train.config import load_config
from train.solver import build_optimizer, set_learning_rate

pytestmark = [requires_reference, pytest.mark.filterwarnings("ignore::UserWarning")]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class TwoGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("reference.yaml", ["solver.steps=[700, 900]"]),  # linear: relative, from 1/3 of each group's LR
        ("batch96_8gpu.yaml", []),  # mlperf_linear: 0.000192 per iteration off both groups, weights from 0
        ("batch256_32gpu.yaml", []),  # mlperf_linear from 0.0006
        ("batch8_1gpu.yaml", []),  # mlperf_linear from 0, the RCP's
    ],
)
def test_learning_rates_equal_the_reference_schedulers(config, overrides):
    solver = load_config(CONFIGS / config, ["train.weights=R-50.pkl", *overrides]).solver
    ours, _ = build_optimizer(TwoGroups(), solver, torch.device("cpu"))
    theirs = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))], "lr": solver.base_lr},
         {"params": [nn.Parameter(torch.zeros(1))], "lr": solver.base_lr * solver.bias_lr_factor}],
        lr=solver.base_lr,
    )  # fmt: skip
    scheduler = reference("solver.lr_scheduler").WarmupMultiStepLR(
        theirs, list(solver.steps), solver.gamma, warmup_factor=solver.warmup_factor,
        warmup_iters=solver.warmup_iters, warmup_method=solver.warmup_method,
    )  # fmt: skip
    checked = set(range(solver.warmup_iters + 2)) | {s + d for s in solver.steps for d in (-1, 0, 1)}
    for iteration in range(max(checked) + 1):
        if iteration in checked:
            set_learning_rate(ours, solver, iteration)
            expected = [group["lr"] for group in theirs.param_groups]
            # mlperf_linear's first weight LR is 0.12 - 625 x 0.000192 = -1e-17 there, 0 here.
            assert [group["lr"] for group in ours.param_groups] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        theirs.step()
        scheduler.step()
    if solver.warmup_method == "mlperf_linear":  # the biases start halfway up: the same absolute offset
        first = solver.base_lr - solver.warmup_iters * solver.warmup_factor
        set_learning_rate(ours, solver, 0)
        assert ours.param_groups[1]["lr"] == pytest.approx(solver.base_lr + first, abs=1e-12)
