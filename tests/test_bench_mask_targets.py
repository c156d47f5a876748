"""tools/bench_mask_targets.py: its three computations give pycocotools' targets, and it reports their ratios."""

import pytest
import torch

from tools.bench_mask_targets import run_benchmark

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2


def test_benchmark_checks_its_results_and_reports_ratios_to_the_host_loop():
    result = run_benchmark(images=2, rois=6, repeats=1, device=torch.device("cpu"))
    assert result["vertices_per_image"] in (256, 512)  # ~250 vertices per image, padded as make_batch pads
    for name in ("own_instance", "every_edge"):
        assert result[f"{name}_cpu_ratio"] == pytest.approx(result[f"{name}_cpu_ms"] / result["reference_cpu_ms"])
