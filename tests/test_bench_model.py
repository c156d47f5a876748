"""tools/bench_model.py reports both step times and their ratio (slow: builds two R-50 models)."""

import pytest

from tools.bench_model import run_model_benchmark
from tests.model_helpers import model_config


@pytest.mark.slow
def test_benchmark_reports_ours_torchvision_and_ratio():
    result = run_model_benchmark(model_config(), (128, 160), batch_size=1, iters=1)
    assert result["ours_step_s"] > 0 and result["torchvision_step_s"] > 0
    assert result["ratio_vs_torchvision"] == pytest.approx(result["ours_step_s"] / result["torchvision_step_s"])
