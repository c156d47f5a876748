"""tools/bench_pipeline.py end to end on tiny shards: every figure is written, bad arguments fail cleanly."""

import json

import pytest

from pipeline_shards import REFERENCE_CONFIG
from tools import bench_pipeline

SMALL = ["--config", str(REFERENCE_CONFIG), "data.min_size=96", "data.max_size=160", "data.num_threads=1"]


def test_benchmark_reports_rates_stages_and_ratios(train_shards, synthetic_coco, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench_pipeline.get_args_parser().parse_args(
        ["--data", str(train_shards), "--batch-size", "2", "--iters", "2", "--warmup", "1",
         "--baseline-images", str(synthetic_coco.train_images),
         "--baseline-annotations", str(synthetic_coco.train_json), "--json", str(out), *SMALL]
    )
    assert bench_pipeline.main(args) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "dali" and result["images_per_s"] > 0
    assert set(result["ratios"]) == {"vs_bare_dali", "cpu_time_vs_bare_dali", "vs_torchvision"}
    assert result["ratios"]["vs_torchvision"] == pytest.approx(
        result["images_per_s"] / result["baselines"]["torchvision"]["images_per_s"]
    )
    assert all(result["stage_ms_per_image"][s] is not None for s in ("read", "decode", "augment", "collate", "wait"))
    assert "ratio vs_bare_dali" in capsys.readouterr().out


def test_torch_backend_reports_its_own_stages(train_shards):
    args = bench_pipeline.get_args_parser().parse_args(
        ["--data", str(train_shards), "--batch-size", "2", "--iters", "2", "--warmup", "1", "--backend", "torch", *SMALL]
    )
    assert bench_pipeline.main(args) == 0


def test_bad_shard_folder_exits_with_one_line(tmp_path, capsys):
    args = bench_pipeline.get_args_parser().parse_args(["--data", str(tmp_path / "none"), "--iters", "1", "--config", str(REFERENCE_CONFIG)])
    assert bench_pipeline.main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1
