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
import re
import signal
import subprocess
import time

import pytest
import torch

from train.checkpoint import list_checkpoints
from train.checkpoint import parameter_digest
from train.main import run

from train_runs import DEMO, ENV, PYTHON, TINY, check_compliance, command, losses


def test_uninterrupted_run_writes_its_results(reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    for key in ("epochs", "box_ap", "mask_ap", "box_ap50", "mask_ap50", "train_images_per_s", "eval_wait_s",
                "eval_background_s", "wall_s", "reached_target", "target_epoch"):
        assert key in summary
    assert summary["iterations"] == 6 and summary["reached_target"] is False and summary["target_epoch"] is None
    # the final evaluation, beside training (the reference config's mode), was awaited before the run ended
    (evaluation,) = summary["evaluations"]
    assert summary["eval_asynchronous"] is True
    assert (evaluation["epoch"], evaluation["iteration"], evaluation["box_ap"]) == (1, 6, summary["box_ap"])
    assert evaluation["wait_s"] >= evaluation["inference_s"] > 0 and summary["eval_wait_s"] == evaluation["wait_s"]
    assert sorted(losses(reference_run)) == [1, 2, 3, 4, 5, 6]
    assert (reference_run / "config.yaml").is_file() and (reference_run / "detections.json").is_file()
    newest = list_checkpoints(reference_run)[-1]
    assert newest.name == "ckpt-00000006.pt"


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_after_sigkill_reproduces_the_run_bit_for_bit(backend, reference_runs, train_shards, val_shards, synthetic_coco, tmp_path):
    reference_run = reference_runs(backend)
    argv = command(train_shards, val_shards, synthetic_coco, tmp_path, f"data.backend={backend}")
    process = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "checkpoints" / "ckpt-00000002.pt"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_checkpoint.exists()
    killed_at = max(losses(tmp_path))
    assert killed_at < 6, "the run finished before it could be killed"

    subprocess.run([*argv, "--resume"], check=True, env=ENV, capture_output=True)
    resumed, reference = losses(tmp_path), losses(reference_run)
    assert sorted(resumed) == sorted(reference)
    for iteration, record in reference.items():
        assert resumed[iteration] == record, f"iteration {iteration} differs after resuming"
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tmp_path, reference_run)]
    assert summaries[0]["parameter_digests"] == summaries[1]["parameter_digests"]


def test_two_processes_with_gloo_keep_identical_weights(train_shards, val_shards, synthetic_coco, tmp_path):
    argv = command(train_shards, val_shards, synthetic_coco, tmp_path, "solver.ims_per_batch=4", "solver.max_iter=3",
                       "train.checkpoint_every=100", "eval.ims_per_batch=4")
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv[1:]]
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


def test_mlperf_log_passes_the_compliance_checker(reference_run, tmp_path):
    code, output = check_compliance(reference_run / "mlperf.log", tmp_path)
    assert code == 0, output  # the demo config is open division
    closed = tmp_path / "closed.log"
    text = (reference_run / "mlperf.log").read_text()
    closed.write_text(text.replace('"key": "submission_division", "value": "open"', '"key": "submission_division", "value": "closed"'))
    code, output = check_compliance(closed, tmp_path)
    failures = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR")) and "FAILED" not in line]
    assert code == 1 and len(failures) == 1, output
    assert "Failed checks for eval_accuracy" in failures[0]  # only the quality target, which a demo cannot reach


def _one_sentence_error(capsys, argv) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_user_errors_are_one_sentence(capsys, reference_run, train_shards, val_shards, synthetic_coco, tmp_path):
    base = command(train_shards, val_shards, synthetic_coco, tmp_path)[2:]
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
