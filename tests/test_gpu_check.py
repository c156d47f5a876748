"""tools/gpu_check.sh: its rehearsal on this CPU (every stage, DALI hidden as on the GPU machine),
its time limits, budget and failure handling, and its refusal without CUDA (shellcheck runs in
test_lint.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.loader import dali_available
from tools import gpu_check

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"

MAX_FILES_BACK = 8  # what the GPU machine returns from its output folder


def check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    result = check("--rehearse", str(out))
    return out, result


def test_rehearsal_runs_every_stage_within_the_files_that_come_back(rehearsal):
    out, result = rehearsal
    report = json.loads((out / "gpu_check.json").read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["mode"] == "rehearsal"
    assert list(report["stages"]) == list(gpu_check.STAGES)
    for name, entry in report["stages"].items():
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
        assert entry["seconds"] > 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.json", "gpu_check.log"] and len(files) <= MAX_FILES_BACK
    assert "==== gpu_tests" in (out / "gpu_check.log").read_text()


def test_rehearsal_figures(rehearsal):
    stages = json.loads((rehearsal[0] / "gpu_check.json").read_text())["stages"]
    figures = {name: entry["figures"] for name, entry in stages.items()}
    environment = figures["environment"]
    assert dali_available() and environment["dali_importable"] is False  # hidden, as on the GPU machine
    assert all(environment["packages"].values())
    assert environment["jpeg_decode"]["shape"] == [3, 480, 640]
    for name in ("train_bf16_graphs", "train_bf16_eager", "train_fp16_graphs", "train_fp32_eager", "train_bf16_graphs_gt100"):
        assert figures[name]["images_per_s"] > 0 and set(figures[name]["stages_s_per_iter"]) == {"forward", "backward", "optimizer"}
        assert figures[name]["graph_replays_per_step"] == 0.0  # no graphs on a CPU
    assert "precision fp16" in figures["train_fp16_graphs"]["setup"]
    assert figures["train_bf16_graphs_gt100"]["gt_per_image"] == [100, 100]
    assert figures["eval_after_capture"]["replays_during_eval"] == 0
    assert figures["eval_after_capture"]["eval_batch_shapes"][0] == figures["eval_after_capture"]["train_batch_shape"]
    assert figures["torch_pipeline"]["backend"] == "torch" and figures["torch_pipeline"]["images_per_s"] > 0
    assert figures["ddp_nccl"]["backend"] == "gloo" and figures["ddp_nccl"]["broadcast_buffers"] is False
    tests = figures["gpu_tests"]
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0
    goals = json.loads((rehearsal[0] / "gpu_check.json").read_text())["goals"]
    model, pipeline = figures["train_bf16_graphs"]["images_per_s"], figures["torch_pipeline"]["images_per_s"]
    assert goals["pipeline_over_model"]["figure"] == pytest.approx(pipeline / model)
    assert goals["training_images_per_s"]["goal"] == 200.0


def test_a_stage_past_its_limit_is_stopped_and_the_next_one_still_runs(tmp_path):
    result = check("--rehearse", str(tmp_path), "--only", "environment,torch_pipeline", "--limit", "environment=0.5")
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert result.returncode == 1
    assert stages["environment"]["status"] == "timeout" and stages["environment"]["seconds"] < 5
    assert stages["torch_pipeline"]["status"] == "ok"


def test_stages_past_the_budget_are_recorded_as_skipped(tmp_path):
    result = check("--rehearse", str(tmp_path), "--budget", "0")
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert result.returncode == 1
    assert list(stages) == list(gpu_check.STAGES) and {e["status"] for e in stages.values()} == {"skipped"}


def test_a_failing_stage_records_its_error_and_traceback(tmp_path, monkeypatch):
    def broken(scale):
        raise ValueError("something CUDA-only broke")

    monkeypatch.setitem(gpu_check.STAGES, "environment", (broken, 60))
    assert gpu_check.run_stage("environment", gpu_check.REHEARSAL, tmp_path / "result.json") == 1
    outcome = json.loads((tmp_path / "result.json").read_text())
    assert outcome["status"] == "failed" and outcome["error"] == "ValueError: something CUDA-only broke"
    assert "in broken" in outcome["traceback"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_refuses_without_cuda_in_one_sentence(tmp_path):
    result = check(str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "tools/gpu_check.sh needs a CUDA GPU; run it on a GPU machine, or rehearse it here with --rehearse"
    )


def test_usage_and_bad_arguments():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode != 0 and "usage: tools/gpu_check.sh [--rehearse] OUT_DIR [WHEELS_DIR]" in result.stderr
    result = check("--rehearse", "/tmp/unused", "--only", "environmnt")
    assert result.returncode == 2 and "unknown stages ['environmnt']" in result.stderr


def test_an_empty_wheels_folder_is_one_sentence(tmp_path):
    result = check(str(tmp_path / "out"), str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"tools/gpu_check.sh: {tmp_path} holds no .whl files; download them with the command in docs/PERFORMANCE.md"
    )
