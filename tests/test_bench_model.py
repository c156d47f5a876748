"""tools/bench_model.py reports both step times and their ratio (slow: builds two R-50 models)."""

import math

import pytest
import torch

from tests.model_helpers import model_config
from tools.bench_model import all_finite, run_model_benchmark


@pytest.mark.slow
def test_benchmark_reports_ours_torchvision_and_ratio():
    result = run_model_benchmark(model_config(), (128, 160), batch_size=1, iters=2)
    assert result["ours_step_s"] > 0 and result["torchvision_step_s"] > 0
    assert result["ratio_vs_torchvision"] == pytest.approx(result["ours_step_s"] / result["torchvision_step_s"])
    assert result["ours_losses_finite"] and result["torchvision_losses_finite"]


def test_one_non_finite_loss_in_any_timed_step_is_reported():
    finite = (0.1, 0.1, {"classifier": torch.tensor(0.7), "mask": torch.tensor(0.3)})
    assert all_finite([finite, finite])
    for bad in (math.nan, math.inf):
        assert not all_finite([finite, (0.1, 0.1, {"classifier": torch.tensor(0.7), "mask": torch.tensor(bad)})])
