"""tools/bench_pipeline.py end to end on tiny shards: every row and ratio is written, bad arguments fail cleanly."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_shards import REFERENCE_CONFIG
from tools import bench_pipeline
from train.throughput import cpu_seconds

SMALL = ["--config", str(REFERENCE_CONFIG), "data.min_size=96", "data.max_size=160", "data.dali_threads=1", "data.torch_workers=1"]


def test_benchmark_reports_every_row_and_both_ratios(train_shards, synthetic_coco, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench_pipeline.get_args_parser().parse_args(
        ["--data", str(train_shards), "--batch-size", "2", "--iters", "2", "--warmup", "1", "--stages",
         "--baseline-images", str(synthetic_coco.train_images),
         "--baseline-annotations", str(synthetic_coco.train_json), "--json", str(out), *SMALL]
    )
    assert bench_pipeline.main(args) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {*bench_pipeline.ROWS, *bench_pipeline.STAGE_ROWS}
    assert all(r["images_per_s"] > 0 and r["cpu_ms_per_image"] > 0 for r in rows.values())
    assert result["backend"] == "dali" and result["images_per_s"] == rows["dali_loader"]["images_per_s"]
    ratio = result["ratios"]["dali_loader/dali_graph"]
    assert ratio["cpu"] == pytest.approx(rows["dali_loader"]["cpu_ms_per_image"] / rows["dali_graph"]["cpu_ms_per_image"])
    assert ratio["rate"] == pytest.approx(rows["dali_loader"]["images_per_s"] / rows["dali_graph"]["images_per_s"])
    assert {"dali_graph/bare_dali", "dali_loader/bare_dali", "torch_loader/torchvision"} <= set(result["ratios"])
    assert all(result["stage_ms_per_image"][s] is not None for s in ("read", "decode", "augment", "collate", "wait"))
    assert "ratio dali_loader/dali_graph" in capsys.readouterr().out


def test_cpu_time_counts_live_child_processes():
    # DataLoader workers decode in child processes: their CPU time must count, not only ours.
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)"])
    try:
        start, own = cpu_seconds(), time.process_time()
        deadline = time.time() + 20
        while cpu_seconds() - start < 0.3 and time.time() < deadline:
            time.sleep(0.05)
        assert cpu_seconds() - start >= 0.3  # counted while the child is still alive
        assert time.process_time() - own < 0.2
    finally:
        child.kill()
        child.wait()


def test_bad_shard_folder_exits_with_one_line(tmp_path, capsys):
    args = bench_pipeline.get_args_parser().parse_args(["--data", str(tmp_path / "none"), "--iters", "1", "--config", str(REFERENCE_CONFIG)])
    assert bench_pipeline.main(args) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_a_torchvision_row_without_its_folder_exits_with_one_line(train_shards, capsys):
    args = bench_pipeline.get_args_parser().parse_args(["--data", str(train_shards), "--rows", "torchvision", *SMALL])
    assert bench_pipeline.main(args) == 1
    assert "--baseline-images" in capsys.readouterr().err


def test_without_dali_the_torch_rows_run(train_shards, tmp_path, monkeypatch):
    # As on the GPU machine, which has no DALI: the default rows and the heading loader are the torch ones.
    monkeypatch.setattr(bench_pipeline, "dali_available", lambda: False)
    out = tmp_path / "bench.json"
    args = bench_pipeline.get_args_parser().parse_args(
        ["--data", str(train_shards), "--batch-size", "2", "--iters", "2", "--warmup", "1", "--json", str(out), *SMALL]
    )
    assert bench_pipeline.main(args) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "torch" and set(result["rows"]) == {"torch_loader"}


def test_sample_check_benchmark_measures_every_sample(train_shards, tmp_path):
    out = tmp_path / "check.json"
    repo = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "tools/bench_sample_check.py", "--data", str(train_shards), "--repeat", "1",
                             "--json", str(out)], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["samples"] == json.loads((train_shards / "manifest.json").read_text())["samples"]
    assert all(figures[f"{row}_us"] > 0 for row in ("crc32", "checked_decode", "unchecked_decode", "read_sample"))
    missing = subprocess.run([sys.executable, "tools/bench_sample_check.py", "--data", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, cwd=repo)
    assert missing.returncode == 2 and "no such shard folder" in missing.stderr


def test_a_sweep_reports_each_setting_plots_it_and_says_how_many_cores_keep_up(train_shards, tmp_path, capsys):
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = bench_pipeline.get_args_parser().parse_args(
        ["--data", str(train_shards), "--batch-size", "2", "--iters", "2", "--warmup", "1", "--sweep", "data.torch_workers=0,1",
         "--model-rate", "1e6", "--plot", str(plot), "--json", str(out), *SMALL]
    )
    assert bench_pipeline.main(args) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "torch" and [row["value"] for row in result["rows"]] == [0, 1]
    for row in result["rows"]:
        assert row["cores_busy"] == pytest.approx(row["images_per_s"] * row["cpu_ms_per_image"] / 1000)
    fastest = max(result["rows"], key=lambda row: row["images_per_s"])
    assert result["cores_per_gpu"] == pytest.approx(1e6 * fastest["cpu_ms_per_image"] / 1000)
    assert f"needs about {result['cores_per_gpu']:.1f} cores per GPU" in result["sentence"]
    assert result["sentence"] in capsys.readouterr().out and plot.stat().st_size > 0


def test_the_cores_sentence_names_the_first_setting_that_keeps_up():
    rows = [{"value": 1, "images_per_s": 40.0, "cpu_ms_per_image": 20.0}, {"value": 2, "images_per_s": 75.0, "cpu_ms_per_image": 24.0},
            {"value": 4, "images_per_s": 120.0, "cpu_ms_per_image": 30.0}]
    result = {"rows": rows, "model_rate": 60.0, "key": "data.dali_threads", "backend": "dali", "machine": {"cpus": 16}}
    result["cores_per_gpu"] = bench_pipeline.cores_per_gpu(rows, 60.0)
    assert result["cores_per_gpu"] == pytest.approx(1.8)  # 60 images/s x 30 CPU ms (the fastest setting's)
    sentence = bench_pipeline.cores_sentence(result)
    assert "about 1.8 cores per GPU (30.0 CPU ms per image at data.dali_threads=4" in sentence
    assert "data.dali_threads=2 already keeps up (75 images/s)" in sentence


def test_the_trace_cost_rows_run_the_loader_traced_and_price_its_spans(train_shards, tmp_path):
    out = tmp_path / "cost.json"
    args = bench_pipeline.get_args_parser().parse_args(
        ["--data", str(train_shards), "--batch-size", "2", "--iters", "3", "--warmup", "1", "--rows", "torch_loader",
         "--trace-cost", "--json", str(out), *SMALL]
    )
    assert bench_pipeline.main(args) == 0
    result = json.loads(out.read_text())
    traced, plain = result["rows"]["torch_loader_traced"], result["rows"]["torch_loader"]
    cost = result["tracing_cost"]["torch_loader"]
    assert traced["spans_per_image"] >= 6  # sample, read, check, record, decode, resize_flip: one each per image at least
    assert cost["share_of_cpu"] == pytest.approx(cost["added_cpu_ms_per_image"] / plain["cpu_ms_per_image"])
    assert cost["measured_cpu_ratio"] == pytest.approx(result["ratios"]["torch_loader_traced/torch_loader"]["cpu"])


@pytest.mark.parametrize("sweep", ["data.prefetch=1,2", "data.torch_workers=one,two"])
def test_a_bad_sweep_exits_with_one_line(train_shards, capsys, sweep):
    args = bench_pipeline.get_args_parser().parse_args(["--data", str(train_shards), "--sweep", sweep, *SMALL])
    assert bench_pipeline.main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1
