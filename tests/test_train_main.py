"""train/main.py end to end on the shared synthetic shards, with a tiny config.

- exact resume: SIGKILL after a checkpoint, resume, and every loss equals an uninterrupted
  run's to the last bit (deterministic CPU settings), as do the final weights;
- two processes with gloo under torchrun: identical weights on both ranks, one checkpoint;
- the MLPerf log passes the 3.1.0 compliance checker (open division; closed except the
  accuracy threshold);
- user errors: one sentence and exit code 2;
- the dry runs' verdict.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.checkpoint import list_checkpoints
from train.components import parameter_digest
from train.main import run

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEMO = REPO / "configs" / "demo.yaml"
TINY = [
    "data.min_size=64",
    "data.max_size=80",
    "data.buckets=[[64, 80], [80, 64]]",
    "data.num_threads=1",
    "solver.ims_per_batch=2",
    "eval.ims_per_batch=2",
    "eval.num_workers=0",
    "solver.max_iter=6",
    "solver.steps=[4, 5]",
    "solver.warmup_iters=2",
    "train.checkpoint_every=2",
    "train.loss_readback_every=1",
    "train.deterministic=true",
    "train.num_threads=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _command(train_shards, val_shards, synthetic_coco, output_dir, *extra):
    return [
        PYTHON, str(REPO / "train" / "main.py"), "--config", str(DEMO),
        "--data", str(train_shards), "--val-data", str(val_shards), "--val-annotations", str(synthetic_coco.val_json),
        *TINY, f"output_dir={output_dir}", *extra,
    ]


def _losses(output_dir: Path) -> dict[int, dict]:
    """iteration -> its logged losses; a re-run iteration (after a resume) keeps its last line."""
    by_iteration = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_iteration[record["iteration"]] = record
    return by_iteration


@pytest.fixture(scope="module")
def reference_runs(train_shards, val_shards, synthetic_coco, tmp_path_factory):
    """backend -> an uninterrupted tiny run (6 iterations, checkpoints every 2, evaluation at the end)."""
    runs = {}

    def run_with(backend: str) -> Path:
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"reference_{backend}")
            command = _command(train_shards, val_shards, synthetic_coco, out, f"data.backend={backend}")
            subprocess.run(command, check=True, env=ENV, capture_output=True)
            runs[backend] = out
        return runs[backend]

    return run_with


@pytest.fixture(scope="module")
def reference_run(reference_runs):
    return reference_runs("dali")


def test_uninterrupted_run_writes_its_results(reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    for key in ("epochs", "box_ap", "mask_ap", "box_ap50", "mask_ap50", "train_images_per_s", "eval_s", "wall_s", "reached_target"):
        assert key in summary
    assert summary["iterations"] == 6 and summary["reached_target"] is False
    assert sorted(_losses(reference_run)) == [1, 2, 3, 4, 5, 6]
    assert (reference_run / "config.yaml").is_file() and (reference_run / "detections.json").is_file()
    newest = list_checkpoints(reference_run)[-1]
    assert newest.name == "ckpt-00000006.pt"


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_after_sigkill_reproduces_the_run_bit_for_bit(backend, reference_runs, train_shards, val_shards, synthetic_coco, tmp_path):
    reference_run = reference_runs(backend)
    command = _command(train_shards, val_shards, synthetic_coco, tmp_path, f"data.backend={backend}")
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "checkpoints" / "ckpt-00000002.pt"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_checkpoint.exists()
    killed_at = max(_losses(tmp_path))
    assert killed_at < 6, "the run finished before it could be killed"

    subprocess.run([*command, "--resume"], check=True, env=ENV, capture_output=True)
    resumed, reference = _losses(tmp_path), _losses(reference_run)
    assert sorted(resumed) == sorted(reference)
    for iteration, record in reference.items():
        assert resumed[iteration] == record, f"iteration {iteration} differs after resuming"
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tmp_path, reference_run)]
    assert summaries[0]["parameter_digests"] == summaries[1]["parameter_digests"]


def test_two_processes_with_gloo_keep_identical_weights(train_shards, val_shards, synthetic_coco, tmp_path):
    command = _command(train_shards, val_shards, synthetic_coco, tmp_path, "solver.ims_per_batch=4", "solver.max_iter=3",
                       "train.checkpoint_every=100", "eval.ims_per_batch=4")
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command[1:]]
    subprocess.run(torchrun, check=True, env=ENV, capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 3
    rank0, rank1 = summary["parameter_digests"]
    assert rank0 == rank1
    checkpoints = list_checkpoints(tmp_path)
    assert [c.name for c in checkpoints] == ["ckpt-00000003.pt"]
    saved = torch.load(checkpoints[0], weights_only=True)["model"]
    model = torch.nn.Module()
    model.state_dict = lambda: saved  # parameter_digest reads the state_dict
    assert parameter_digest(model) == rank0


def _check_compliance(log: Path, tmp_path: Path) -> tuple[int, str]:
    result = subprocess.run(
        [PYTHON, "-m", "mlperf_logging.compliance_checker", "--usage", "training", "--ruleset", "3.1.0",
         "--log_output", str(tmp_path / "checker.log"), str(log)],
        env=ENV, capture_output=True, text=True,
    )
    return result.returncode, result.stdout + result.stderr


def test_mlperf_log_passes_the_compliance_checker(reference_run, tmp_path):
    code, output = _check_compliance(reference_run / "mlperf.log", tmp_path)
    assert code == 0, output  # the demo config is open division
    closed = tmp_path / "closed.log"
    text = (reference_run / "mlperf.log").read_text()
    closed.write_text(text.replace('"key": "submission_division", "value": "open"', '"key": "submission_division", "value": "closed"'))
    code, output = _check_compliance(closed, tmp_path)
    failures = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR")) and "FAILED" not in line]
    assert code == 1 and len(failures) == 1, output
    assert "Failed checks for eval_accuracy" in failures[0]  # only the quality target, which a demo cannot reach


def _one_sentence_error(capsys, argv) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_user_errors_are_one_sentence(capsys, reference_run, train_shards, val_shards, synthetic_coco, tmp_path):
    base = _command(train_shards, val_shards, synthetic_coco, tmp_path)[2:]
    assert "did you mean 'solver.base_lr'" in _one_sentence_error(capsys, [*base, "solver.base_lrr=0.1"])
    missing = tmp_path / "no-such-shards"
    assert str(missing) in _one_sentence_error(capsys, [*base, "--data", str(missing)])
    checkpoint = list_checkpoints(reference_run)[-1]
    err = _one_sentence_error(capsys, [*base, "model.fpn_channels=16", "--resume", str(checkpoint)])
    assert "written by another config (model.fpn_channels: 32 -> 16)" in err


def test_dry_runs_name_the_bottleneck(train_shards, tmp_path):
    report = tmp_path / "dry.json"
    argv = ["--config", str(DEMO), "--data", str(train_shards), *TINY, "--dry-run", "all", "--iters", "2", "--report", str(report)]
    assert run(argv) == 0
    figures = json.loads(report.read_text())
    pipeline, model = figures["pipeline"]["images_per_s"], figures["model"]["images_per_s"]
    assert figures["verdict"]["headroom"] == pytest.approx(pipeline / model)
    assert figures["verdict"]["bottleneck"] == ("model" if pipeline >= model else "pipeline")
    assert figures["full"]["images_per_iter"] == 2
    assert set(figures["model"]["stages_s_per_iter"]) == {"forward", "backward", "optimizer"}
    assert re.search(r"bottleneck", figures["verdict"]["text"])
