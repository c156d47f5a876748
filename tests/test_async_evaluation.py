"""Evaluation beside training (train/async_evaluation.py) on a replayed detection set, in this process.

The scoring process is forked from the test, so a stand-in `COCOEvaluator.score` patched in here
runs there: it holds the scoring back until the test lets it go, which shows `poll()` returning
without waiting, and gives a process to kill. Every result is compared with the synchronous
`COCOEvaluator.evaluate` of the same detections.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from train import async_evaluation
from train.async_evaluation import EvaluationLost, EvaluationQueue
from train.distributed import DistributedContext
from tools.bench_eval import make_eval_set
from train.evaluation import COCOEvaluator, EvaluationError, coco_results

from test_evaluation import _ReplayModel

ONE_PROCESS = DistributedContext(0, 1, 0, torch.device("cpu"))
DEADLINE_S = 120


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {DEADLINE_S} s"
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def held_scoring(monkeypatch, tmp_path):
    """Scoring waits until the test creates `release` and records its pid in `pid_file` first."""
    pid_file, release = tmp_path / "scoring.pid", tmp_path / "release"
    real = COCOEvaluator.score

    def held(self, per_rank):
        pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
        pid_file.with_suffix(".tmp").rename(pid_file)  # whole when it appears: the test reads it at once
        deadline = time.monotonic() + DEADLINE_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return real(self, per_rank)

    monkeypatch.setattr(COCOEvaluator, "score", held)
    return pid_file, release


def _setup(tmp_path, *, num_workers=2, scoring_workers=1, asynchronous=True):
    eval_set = make_eval_set(tmp_path / "set", num_images=12, dets_per_image=10, seed=6, flip_fraction=0.5)
    evaluator = COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=num_workers,
                              scoring_workers=scoring_workers, max_pending_per_worker=None)
    queue = EvaluationQueue(evaluator, ONE_PROCESS, asynchronous=asynchronous, detections_path=tmp_path / "detections.json")
    loader = [batch for batch, _ in eval_set.batches(4)]
    return eval_set, evaluator, queue, _ReplayModel(eval_set).train(), loader


def _synchronous_metrics(eval_set):
    direct = COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=0)
    for batch, detections in eval_set.batches(4):
        direct.process(batch, detections)
    return direct.evaluate(), coco_results(direct.gathered)


def test_poll_returns_while_cocoeval_runs_and_the_result_equals_the_synchronous_one(held_scoring, tmp_path):
    pid_file, release = held_scoring
    eval_set, evaluator, queue, model, loader = _setup(tmp_path, scoring_workers=2)  # COCOeval in a pool of its own
    with evaluator:
        assert queue.start(1, 100, model, loader, autocast=contextlib.nullcontext) == []
        assert model.training  # inference restored the training mode
        # polled as the training loop does: the encoders finish, a poll gathers and forks the scoring
        _wait_for(lambda: queue.poll() == [] and pid_file.exists(), "scoring process")
        for _ in range(5):
            assert queue.poll() == [] and queue.pending  # COCOeval is held: the loop goes on, nothing waits
        assert queue.start(2, 200, model, loader, autocast=contextlib.nullcontext) == []
        release.touch()
        finished = queue.wait()
        queue.close()
    expected, detections = _synchronous_metrics(eval_set)
    assert [(e.epoch, e.iteration) for e in finished] == [(1, 100), (2, 200)]  # in epoch order
    assert all(e.results == expected for e in finished)
    assert json.loads((tmp_path / "detections.json").read_text()) == json.loads(json.dumps(detections))
    timing = finished[0].timing()
    assert timing["background_s"] >= timing["cocoeval_s"] > 0 and timing["wait_s"] >= timing["inference_s"] > 0
    assert not queue.pending


def test_synchronous_mode_returns_the_result_at_once(tmp_path):
    eval_set, evaluator, queue, model, loader = _setup(tmp_path, num_workers=0, asynchronous=False)
    (evaluation,) = queue.start(3, 30, model, loader, autocast=contextlib.nullcontext)
    assert evaluation.results == _synchronous_metrics(eval_set)[0]
    assert evaluation.background_s == 0.0 and evaluation.timing()["wait_s"] >= evaluation.cocoeval_s > 0
    assert not queue.pending


def test_a_killed_scoring_process_is_a_lost_evaluation_in_one_sentence(held_scoring, tmp_path):
    pid_file, _ = held_scoring
    _, evaluator, queue, model, loader = _setup(tmp_path, num_workers=0)
    with evaluator:
        queue.start(4, 40, model, loader, autocast=contextlib.nullcontext)
        _wait_for(pid_file.exists, "scoring process")
        os.kill(int(pid_file.read_text()), 9)
        with pytest.raises(EvaluationLost) as lost:
            queue.wait()
        queue.close()
    sentence = str(lost.value)
    assert sentence.startswith("epoch 4's evaluation could not finish beside training: its scoring process (pid ")
    assert "was killed by SIGKILL" in sentence and sentence.endswith("run.json keeps it due, and --resume runs it first")
    assert "\n" not in sentence


def test_close_kills_a_running_scoring_process(held_scoring, tmp_path):
    pid_file, _ = held_scoring
    _, evaluator, queue, model, loader = _setup(tmp_path, num_workers=0)
    with evaluator:
        queue.start(5, 50, model, loader, autocast=contextlib.nullcontext)
        _wait_for(pid_file.exists, "scoring process")
        pid = int(pid_file.read_text())
        queue.close()
    assert not _pid_alive(pid) and not queue.pending


def test_a_user_error_found_while_scoring_is_the_synchronous_sentence(tmp_path):
    eval_set, _, _, model, loader = _setup(tmp_path, num_workers=0)
    other = make_eval_set(tmp_path / "other", num_images=4, dets_per_image=2, seed=9)
    for asynchronous in (True, False):
        evaluator = COCOEvaluator(other.annotations_file, eval_set.categories, num_workers=0)
        queue = EvaluationQueue(evaluator, ONE_PROCESS, asynchronous=asynchronous, detections_path=None)
        with pytest.raises(EvaluationError, match=r"evaluated images \(e.g. id \d+\) are not in .*pass the annotation file"):
            queue.start(1, 10, model, loader, autocast=contextlib.nullcontext)
            queue.wait()
        queue.close()


def test_the_result_comes_before_detections_json_and_close_lets_it_be_written(monkeypatch, tmp_path):
    release = tmp_path / "release"
    real = async_evaluation.save_detections

    def held(per_rank, path):  # runs in the scoring process, after it sent the result
        deadline = time.monotonic() + DEADLINE_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        real(per_rank, path)

    monkeypatch.setattr(async_evaluation, "save_detections", held)
    eval_set, evaluator, queue, model, loader = _setup(tmp_path, num_workers=0)
    with evaluator:
        queue.start(6, 60, model, loader, autocast=contextlib.nullcontext)
        finished = []
        _wait_for(lambda: finished.extend(queue.poll()) or finished, "result")
        assert finished[0].results == _synchronous_metrics(eval_set)[0]
        assert not (tmp_path / "detections.json").exists()  # still held in the scoring process
        release.touch()
        queue.close()
    assert json.loads((tmp_path / "detections.json").read_text()) == json.loads(json.dumps(_synchronous_metrics(eval_set)[1]))
