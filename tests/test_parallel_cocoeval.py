"""COCOeval split by category over processes: the numbers of one process, checked against the libraries run directly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tools.bench_eval import make_eval_set
from train.evaluation import GEOMETRY, IOU_TYPES, COCOEvaluator, coco_results
from train.parallel_cocoeval import category_costs, plan_tasks


def _library_run(backend: str, annotations_file, results) -> dict:
    """One process, the library's own calls on the whole results file (its default settings)."""
    if backend == "faster":
        from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster

        coco, cocoeval = FasterCOCO, lambda gt, dt, t: COCOeval_faster(gt, dt, t, print_function=lambda *a: None)
    else:
        coco, cocoeval = COCO, COCOeval
    gt = coco(str(annotations_file))
    evaluators = {}
    for iou_type in IOU_TYPES:
        evaluator = cocoeval(gt, gt.loadRes(coco_results(results, geometry=(GEOMETRY[iou_type],))), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        evaluators[iou_type] = evaluator
    return evaluators


@pytest.fixture(scope="module")
def scored_set(tmp_path_factory):
    """A generated set (crowd regions, images without objects, 20 classes) and its encoded detections."""
    eval_set = make_eval_set(tmp_path_factory.mktemp("split"), num_images=60, dets_per_image=30, seed=3, num_classes=20)
    with COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=0) as evaluator:
        for batch, detections in eval_set.batches(16):
            evaluator.process(batch, detections)
        return eval_set, evaluator.results()


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_split_over_processes_equals_one_process_of_the_library(scored_set, backend, capsys):
    eval_set, results = scored_set
    expected = _library_run(backend, eval_set.annotations_file, results)
    assert 0.1 < expected["segm"].stats[0] < 0.9
    for workers in (1, 2, 3):
        evaluator = COCOEvaluator(eval_set.annotations_file, eval_set.categories, backend=backend, scoring_workers=workers)
        got = evaluator.cocoeval(results)
        assert len({timing.task.category_ids for timing in evaluator.task_timings}) == (1 if workers == 1 else 2 * workers)
        for iou_type in IOU_TYPES:
            assert got[iou_type].stats.tolist() == expected[iou_type].stats.tolist(), (workers, iou_type)
            for name in ("precision", "recall", "scores"):
                np.testing.assert_array_equal(got[iou_type].eval[name], expected[iou_type].eval[name])
        capsys.readouterr()


def test_category_costs_count_detections_truth_and_their_pairs(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=3, dets_per_image=4, seed=5, num_classes=3)
    gt = COCO(str(eval_set.annotations_file))
    images = sorted(gt.getImgIds())
    detections = {images[0]: np.array([1, 1, 2]), images[2]: np.array([1])}
    costs = category_costs(gt, np.array([images[0]] * 3 + [images[2]]), np.array([1, 1, 2, 1]))
    for category_id in gt.getCatIds():
        expected = 1
        for image_id in images:
            truth = len(gt.getAnnIds(imgIds=[image_id], catIds=[category_id]))
            found = int((detections.get(image_id, np.array([])) == category_id).sum())
            expected += truth + found + truth * found
        assert costs[category_id] == expected


def test_plan_tasks_covers_every_category_once_per_type_heaviest_first():
    costs = {1: 100.0, **{c: 5.0 for c in range(2, 22)}}
    tasks = plan_tasks(costs, IOU_TYPES, workers=2)
    for iou_type in IOU_TYPES:
        groups = [t.category_ids for t in tasks if t.iou_type == iou_type]
        assert sorted(c for g in groups for c in g) == sorted(costs) and len(groups) == 4
        assert (1,) in groups  # the heavy category alone; the others spread evenly
    assert [t.cost for t in tasks] == sorted((t.cost for t in tasks), reverse=True)
    assert tasks[0].iou_type == "segm" and tasks[0].category_ids == (1,)
    assert [(t.iou_type, t.category_ids) for t in plan_tasks(costs, IOU_TYPES, workers=1)] == [
        ("segm", tuple(sorted(costs))), ("bbox", tuple(sorted(costs)))
    ]


def _hung_up(task: int) -> int:
    """A task that receives a terminal's hangup, as every process of the terminal's group does."""
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(0.2)  # the signal is delivered before the task returns
    return task


def test_a_hangup_reaching_the_scoring_processes_leaves_them_their_tasks():
    # A pool process killed inside a task leaves the pool waiting for that result for ever: the
    # trainer, which handles the hangup with a checkpoint (train/interrupts.py), would hang instead.
    # The pool's processes are forked, so the test runs it in a child with a deadline.
    script = (
        "from tests.test_parallel_cocoeval import _hung_up\n"
        "from train.parallel_cocoeval import run_tasks\n"
        "print(sorted(arrays for _, arrays in run_tasks([1, 2, 3, 4], _hung_up, 2)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stdout.strip()) == (0, "[1, 2, 3, 4]"), done.stderr
