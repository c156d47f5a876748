"""Evaluation beside training through the real command line: the loop does not wait, the stop, faults.

The runs are tests/train_runs.py's tiny demo runs over three epochs (11 iterations each). The
stand-in COCOeval of tests/held_cocoeval.py holds epoch 1's scoring until training has logged
a later iteration, which a loop waiting for COCOeval never would: the tests assert the order of
records (metrics.jsonl, the MLPerf log, run.json), never a duration. Results and losses are
compared with an uninterrupted run's, bit for bit (deterministic CPU settings).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from train.checkpoint import list_checkpoints

from train_runs import ENV, PYTHON, REPO, check_compliance, command, losses

DEADLINE_S = 300
HELD = str(REPO / "tests" / "held_cocoeval.py")
SCHEDULE = ["solver.max_iter=33", "solver.steps=[24, 30]", "solver.base_lr=0.005"]  # three epochs of 11 iterations
REACH_AT_ONCE = ["eval.box_ap_target=0.0", "eval.mask_ap_target=0.0"]  # epoch 1's result reaches the target
HOLD = str(10**9)  # an iteration never logged: the stand-in holds COCOeval until something is killed
TIMELINE = ("run_start", "block_start", "epoch_start", "epoch_stop", "eval_start", "block_stop", "eval_stop",
            "eval_accuracy", "run_stop")


@pytest.fixture
def argv(train_shards, val_shards, synthetic_coco):
    """output_dir -> the tiny three-epoch run's arguments after `python train/main.py`."""
    return lambda out, *extra: [*command(train_shards, val_shards, synthetic_coco, out, *SCHEDULE, *extra)[2:]]


@pytest.fixture(scope="module")
def uninterrupted(train_shards, val_shards, synthetic_coco, tmp_path_factory) -> Path:
    """The three-epoch run, evaluation beside training, nothing held or killed."""
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(command(train_shards, val_shards, synthetic_coco, out, *SCHEDULE), check=True, env=ENV,
                   capture_output=True)
    return out


def _timeline(log: Path) -> list[tuple]:
    """(key, epoch) of the MLPerf log's run events, in the log's order (status for run_stop)."""
    events = []
    for line in log.read_text().splitlines():
        event = json.loads(line.split(" ", 1)[1])
        if event["key"] in TIMELINE:
            meta = event["metadata"]
            events.append((event["key"], meta.get("epoch_num", meta.get("first_epoch_num", meta.get("status")))))
    return events


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _evaluations(out: Path) -> dict[int, dict]:
    """epoch -> its bbox and segm stats, from run.json."""
    return {e["epoch"]: {k: e[k] for k in ("bbox", "segm")} for e in json.loads((out / "run.json").read_text())["evaluations"]}


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {DEADLINE_S} s"
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _held_run(argv, out: Path, record: Path, until: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, HELD, str(record), until, *argv(out, *extra)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_training_goes_on_while_cocoeval_runs_and_stops_at_the_first_epoch_reaching_the_target(
    argv, uninterrupted, tmp_path
):
    out, record = tmp_path / "run", tmp_path / "held.jsonl"
    result = subprocess.run([PYTHON, HELD, str(record), "13", *argv(out, *REACH_AT_ONCE)], env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    held = _records(record)
    assert held[1]["saw_iteration"] >= 13, held  # epoch 2's steps were logged while epoch 1's COCOeval waited
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["iterations"]
    assert summary["reached_target"] and summary["target_epoch"] == 1 and summary["epochs"] == 1
    assert 13 <= stopped_at < 33 and [e["epoch"] for e in summary["evaluations"]] == [1]
    # evaluation beside training left training as it was: the steps it ran equal the uninterrupted run's
    reference = losses(uninterrupted)
    assert losses(out) == {i: reference[i] for i in range(1, stopped_at + 1)}
    assert _evaluations(out) == {1: _evaluations(uninterrupted)[1]}

    timeline = _timeline(out / "mlperf.log")
    # the last result before run_stop is the epoch that reached the target (what MLPerf's RCP check counts)
    assert timeline[-2:] == [("eval_accuracy", 1), ("run_stop", "success")]
    assert [e for e in timeline if e[0] == "eval_accuracy"] == [("eval_accuracy", 1)]
    order = [timeline.index(e) for e in [("eval_start", 1), ("block_stop", 1), ("epoch_start", 2), ("eval_stop", 1)]]
    assert order == sorted(order), timeline  # epoch 2 began before epoch 1's result came in
    if stopped_at < 22:  # the usual case: the result came in during epoch 2, which is not counted
        assert timeline == [
            ("run_start", None), ("block_start", 1), ("epoch_start", 1), ("epoch_stop", 1), ("eval_start", 1),
            ("block_stop", 1), ("block_start", 2), ("epoch_start", 2), ("eval_stop", 1), ("eval_accuracy", 1),
            ("run_stop", "success"),
        ]
    code, output = check_compliance(out / "mlperf.log", tmp_path)
    assert code == 0, output
    assert json.loads((out / "run.json").read_text())["evaluations_due"] == []


def test_two_ranks_stop_at_the_same_step_when_a_result_reaches_the_target(argv, tmp_path):
    out, record = tmp_path / "run", tmp_path / "held.jsonl"
    ranks = ["solver.ims_per_batch=4", "eval.ims_per_batch=4"]  # 6 iterations per epoch on each rank
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", HELD, str(record), "8"]
    result = subprocess.run([*torchrun, *argv(out, *REACH_AT_ONCE, *ranks)], env=ENV, capture_output=True, text=True,
                            timeout=DEADLINE_S)  # ranks disagreeing on the stop step would hang in a collective
    assert result.returncode == 0, result.stderr
    assert _records(record)[1]["saw_iteration"] >= 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["reached_target"] and summary["target_epoch"] == 1
    assert summary["iterations"] >= 8
    rank0, rank1 = summary["parameter_digests"]
    assert rank0 == rank1  # both ranks trained the same steps and stopped after the same one
    code, output = check_compliance(out / "mlperf.log", tmp_path)
    assert code == 0, output


def test_synchronous_mode_evaluates_the_same_at_each_epoch_end(argv, uninterrupted, tmp_path):
    out = tmp_path / "run"
    subprocess.run([PYTHON, str(REPO / "train" / "main.py"), *argv(out, "eval.asynchronous=false")], check=True, env=ENV,
                   capture_output=True)
    assert _evaluations(out) == _evaluations(uninterrupted) and len(_evaluations(out)) == 3
    assert losses(out) == losses(uninterrupted)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, uninterrupted)]
    assert summaries[0]["parameter_digests"] == summaries[1]["parameter_digests"]
    assert summaries[0]["eval_asynchronous"] is False and summaries[0]["eval_background_s"] == 0.0
    assert [e["epoch"] for e in summaries[1]["evaluations"]] == [1, 2, 3]  # the last one was awaited
    timeline = _timeline(out / "mlperf.log")
    for epoch in (1, 2):  # each result before the next epoch starts
        assert timeline.index(("eval_accuracy", epoch)) < timeline.index(("block_stop", epoch)) \
            < timeline.index(("block_start", epoch + 1))
    code, output = check_compliance(out / "mlperf.log", tmp_path)
    assert code == 0, output


def test_killed_while_an_evaluation_is_pending_resume_runs_it_on_its_checkpoints_weights(argv, uninterrupted, tmp_path):
    out, record = tmp_path / "run", tmp_path / "held.jsonl"
    trainer = _held_run(argv, out, record, HOLD, "train.keep_checkpoints=1")
    _wait_for(lambda: (out / "checkpoints" / "ckpt-00000014.pt").exists() and _records(record), trainer,
              "a checkpoint in epoch 2")
    scoring = _records(record)[0]["pid"]
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + DEADLINE_S
    while not _gone(scoring):  # the scoring process dies with its trainer
        assert time.monotonic() < deadline, "the scoring process outlived its trainer"
        time.sleep(0.02)
    state = json.loads((out / "run.json").read_text())
    assert state["evaluations_due"] == [{"epoch": 1, "iteration": 11, "checkpoint": "ckpt-00000011.pt"}]
    assert state["evaluations"] == []
    names = [p.name for p in list_checkpoints(out)]
    assert names[0] == "ckpt-00000011.pt" and len(names) == 2  # kept for its evaluation despite keep_checkpoints=1
    resumed_from = list_checkpoints(out)[-1]

    result = subprocess.run([PYTHON, str(REPO / "train" / "main.py"), *argv(out, "train.keep_checkpoints=1"), "--resume"],
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "running the evaluation of epoch 1 that the previous attempt did not finish (ckpt-00000011.pt)" in result.stdout
    assert f"resumed from {resumed_from}" in result.stdout
    assert _evaluations(out) == _evaluations(uninterrupted)  # epoch 1 on its own weights, not the resumed ones
    assert losses(out) == losses(uninterrupted)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, uninterrupted)]
    assert summaries[0]["parameter_digests"] == summaries[1]["parameter_digests"]
    assert json.loads((out / "run.json").read_text())["evaluations_due"] == []
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000033.pt"]  # no longer due: rotated
    timeline = _timeline(out / "mlperf-attempt-2.log")
    assert timeline[:4] == [("run_start", None), ("block_start", 1), ("eval_start", 1), ("block_stop", 1)]
    assert [e[1] for e in timeline if e[0] == "eval_accuracy"] == [1, 2, 3]
    code, output = check_compliance(out / "mlperf-attempt-2.log", tmp_path)
    assert code == 0, output


def test_sigterm_while_an_evaluation_is_pending_stops_with_a_checkpoint_and_keeps_it_due(argv, tmp_path):
    out, record = tmp_path / "run", tmp_path / "held.jsonl"
    trainer = _held_run(argv, out, record, HOLD)
    _wait_for(lambda: _records(record) and max(losses(out), default=0) >= 13, trainer, "epoch 2's steps")
    scoring = _records(record)[0]["pid"]
    trainer.send_signal(signal.SIGTERM)
    _, stderr = trainer.communicate(timeout=DEADLINE_S)
    assert trainer.returncode == 143, stderr
    stopped_at = max(losses(out))
    newest = out / "checkpoints" / f"ckpt-{stopped_at:08d}.pt"
    assert stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM after iteration {stopped_at}; its newest checkpoint is {newest}: continue with --resume"
    )
    assert _gone(scoring)
    state = json.loads((out / "run.json").read_text())
    assert state["evaluations_due"] == [{"epoch": 1, "iteration": 11, "checkpoint": "ckpt-00000011.pt"}]
    assert (out / "checkpoints" / "ckpt-00000011.pt").exists() and list_checkpoints(out)[-1] == newest
    assert not (out / "summary.json").exists()


def test_a_killed_scoring_process_stops_the_run_in_one_sentence_with_a_checkpoint(argv, tmp_path):
    out, record = tmp_path / "run", tmp_path / "held.jsonl"
    trainer = _held_run(argv, out, record, HOLD)
    _wait_for(lambda: _records(record) and max(losses(out), default=0) >= 13, trainer, "epoch 2's steps")
    scoring = _records(record)[0]["pid"]
    os.kill(scoring, signal.SIGKILL)  # as the out-of-memory killer would
    _, stderr = trainer.communicate(timeout=DEADLINE_S)
    assert trainer.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == (
        f"error: epoch 1's evaluation could not finish beside training: its scoring process (pid {scoring}) was killed "
        "by SIGKILL (out of memory? killed by hand?); run.json keeps it due, and --resume runs it first"
    )
    stopped_at = max(losses(out))
    assert list_checkpoints(out)[-1].name == f"ckpt-{stopped_at:08d}.pt"  # the steps since the last checkpoint kept
    state = json.loads((out / "run.json").read_text())
    assert state["evaluations_due"] == [{"epoch": 1, "iteration": 11, "checkpoint": "ckpt-00000011.pt"}]
    assert state["attempts"][-1]["ended"] == "stopped: " + last.removeprefix("error: ")
    run_stop = _timeline(out / "mlperf.log")[-1]
    assert run_stop == ("run_stop", "aborted")
    assert torch.load(list_checkpoints(out)[-1], weights_only=True)["iteration"] == stopped_at
