"""tools/gpu_check.sh: its rehearsal on this CPU (every stage, DALI hidden as on the GPU machine,
the reference model at a quarter of its width), the stages sharing a process, its time limits,
budget and failure handling, its refusal without CUDA, --help and --fetch-wheels (shellcheck
runs in test_lint.py)."""

import json
import math
import os
import subprocess
import sys
import time
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


def test_rehearsal_shares_one_build_among_the_graphed_bf16_stages(rehearsal):
    stages = json.loads((rehearsal[0] / "gpu_check.json").read_text())["stages"]
    processes = {name: entry["process"] for name, entry in stages.items()}
    shared = ["train_bf16_graphs", "train_bf16_graphs_gt100", "eval_after_capture", "no_host_sync"]
    assert {processes[name] for name in shared} == {"bf16_graphs"}
    assert processes["train_bf16_eager"] == processes["train_fp32_eager"] == "eager"
    assert len(set(processes.values())) == 7  # processes started, for eleven stages
    assert stages["train_bf16_graphs"]["figures"]["built_by_this_stage"] is True
    assert stages["train_bf16_graphs_gt100"]["figures"]["built_by_this_stage"] is False
    log = (rehearsal[0] / "gpu_check.log").read_text()
    assert log.count("building the model") == 5  # bf16 graphs, bf16 eager, fp32 eager, fp16 graphs, ddp
    assert list(stages).index("gpu_tests") < list(stages).index("ddp_nccl")


def test_rehearsal_figures(rehearsal):
    stages = json.loads((rehearsal[0] / "gpu_check.json").read_text())["stages"]
    figures = {name: entry["figures"] for name, entry in stages.items()}
    environment = figures["environment"]
    assert dali_available() and environment["dali_importable"] is False  # hidden, as on the GPU machine
    assert all(environment["packages"].values())
    assert environment["jpeg_decode"]["shape"] == [3, 480, 640]
    for name in ("train_bf16_graphs", "train_bf16_eager", "train_fp16_graphs", "train_fp32_eager", "train_bf16_graphs_gt100",
                 "ddp_nccl"):
        assert figures[name]["images_per_s"] > 0 and set(figures[name]["stages_s_per_iter"]) == {"forward", "backward", "optimizer"}
        assert figures[name]["graph_replays_per_step"] == 0.0  # no graphs on a CPU
        # the reference model, random weights: at the schedule's LR its second step is NaN; here every timed step is finite
        assert figures[name]["losses_finite"] and len(figures[name]["losses"]) == gpu_check.REHEARSAL.iters
        assert all(math.isfinite(row["total"]) for row in figures[name]["losses"]) and "LR 0" in figures[name]["setup"]
    assert figures["no_host_sync"]["losses_finite"] and len(figures["no_host_sync"]["losses"]) == gpu_check.REHEARSAL.warmup
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


def test_a_breaking_stage_records_its_error_and_traceback_and_ends_its_process(tmp_path, monkeypatch):
    def broken(session):
        raise ValueError("something CUDA-only broke")

    def failing(session):
        raise gpu_check.CheckFailed("a check failed", {"images_per_s": 2.0})

    monkeypatch.setitem(gpu_check.STAGES, "environment", gpu_check.Stage(broken, 60, "environment"))
    monkeypatch.setitem(gpu_check.STAGES, "torch_pipeline", gpu_check.Stage(failing, 60, "environment"))
    assert gpu_check.run_stages(["torch_pipeline", "environment", "gpu_tests"], gpu_check.REHEARSAL, tmp_path) == 3
    outcome = json.loads((tmp_path / "environment.json").read_text())
    assert outcome["status"] == "failed" and outcome["error"] == "ValueError: something CUDA-only broke"
    assert "in broken" in outcome["traceback"]
    # a failed check keeps its figures and the process goes on; a broken stage ends it before the next one
    assert json.loads((tmp_path / "torch_pipeline.json").read_text())["figures"] == {"images_per_s": 2.0}
    assert not (tmp_path / "gpu_tests.json").exists()


class ScriptedProcesses(gpu_check.StageProcesses):
    """Stage processes that are one-line Python scripts: each run writes the results `script` says, then exits."""

    def __init__(self, tmp_path, log, scripts):
        super().__init__(False, dict(os.environ), log, tmp_path, time.perf_counter() + 60, {})
        self.scripts = scripts
        self.started = []

    def command(self, names):
        self.started.append(names)
        return [sys.executable, "-c", self.scripts.pop(0)]


def result_script(folder, names, exit_code):
    writes = "; ".join(f"open({str(folder / f'{n}.json')!r}, 'w').write('{{\"status\": \"ok\", \"figures\": {{}}}}')"
                       for n in names)
    return f"import sys; {writes}; sys.exit({exit_code})"


def test_the_stages_after_a_broken_one_run_in_a_fresh_process(tmp_path):
    names = ["train_bf16_graphs", "train_bf16_graphs_gt100", "eval_after_capture", "no_host_sync"]
    with open(tmp_path / "log", "w") as log:
        runner = ScriptedProcesses(tmp_path, log, [result_script(tmp_path, names[:2], gpu_check.STOPPED_EARLY)])
        assert [name for name, _ in runner.run(names)] == names[:2]  # the third one is the caller's to start again
        runner.scripts.append(result_script(tmp_path, names[2:], 0))
        assert [name for name, _ in runner.run(names[2:])] == names[2:]
    assert runner.started == [names, names[2:]]


def test_a_stage_process_that_dies_fails_the_stage_it_was_running(tmp_path):
    with open(tmp_path / "log", "w") as log:
        runner = ScriptedProcesses(tmp_path, log, [result_script(tmp_path, ["environment"], 0).replace("sys.exit(0)", "1/0")])
        entries = dict(runner.run(["environment", "torch_pipeline"]))
    assert entries["environment"]["status"] == "ok"
    assert entries["torch_pipeline"]["status"] == "failed" and "exited with 1 before writing a result" in (
        entries["torch_pipeline"]["error"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_refuses_without_cuda_in_one_sentence(tmp_path):
    result = check(str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "tools/gpu_check.sh needs a CUDA GPU; run it on a GPU machine, or rehearse it here with --rehearse"
    )


def test_usage_help_and_bad_arguments():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("usage: tools/gpu_check.sh [--rehearse] OUT_DIR [WHEELS_DIR]")
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: tools/gpu_check.sh")
    assert "tools/gpu_check.sh --fetch-wheels .whl" in result.stdout and "--rehearse OUT_DIR" in result.stdout
    result = check("--rehearse", "/tmp/unused", "--only", "environmnt")
    assert result.returncode == 2 and "unknown stages ['environmnt']" in result.stderr


def test_an_empty_wheels_folder_is_one_sentence(tmp_path):
    result = check(str(tmp_path / "out"), str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"tools/gpu_check.sh: {tmp_path} holds no .whl files; download them with tools/gpu_check.sh --fetch-wheels {tmp_path}"
    )


FAKE_PIP = """#!/usr/bin/env bash
# Stands in for `python -m pip download ... -d DIR -r FILE`: records its arguments, writes one wheel per pinned line.
echo "$@" > "$CALLS"
while [ $# -gt 0 ]; do case $1 in -d) dir=$2; shift ;; -r) file=$2; shift ;; esac; shift; done
grep -v '^#' "$file" | while IFS='=' read -r name _ version; do
  head -c 1000 /dev/zero > "$dir/${name//-/_}-$version-py3-none-any.whl"
done
"""


def test_fetch_wheels_downloads_the_pinned_wheels_for_the_gpu_machine_and_prints_their_sizes(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PIP)
    fake.chmod(0o755)
    env = {"PYTHON": str(fake), "PATH": "/usr/bin:/bin", "CALLS": str(tmp_path / "calls")}
    result = subprocess.run(["bash", str(SCRIPT), "--fetch-wheels", str(tmp_path / "whl")], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().split()
    assert calls[:3] == ["-m", "pip", "download"] and {"--no-deps", "--only-binary=:all:", "--python-version", "3.12"} <= set(calls)
    assert calls[calls.index("-r") + 1] == "tools/gpu_wheels.txt"
    lines = result.stdout.splitlines()
    assert sorted(line.split()[1].split("-")[0] for line in lines[:-1]) == sorted(
        name.replace("-", "_") for name in gpu_check.wheel_packages())
    assert all(line.split()[0] == "1000" for line in lines[:-1])
    assert lines[-1].split()[:4] == ["4000", "bytes", "in", "4"]
    assert gpu_check.wheel_packages() == ["pycocotools", "mlperf-logging", "webdataset", "braceexpand"]
