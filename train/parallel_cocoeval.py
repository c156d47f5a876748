"""COCOeval of one pass split over processes by category, with the numbers of one process.

COCOeval accumulates category by category: the slices `precision[:, :, k]`, `recall[:, k]`
and `scores[:, :, k]` of category k come from the per-image evaluations of category k alone
(over all images, area ranges and detection limits). So each process runs the library's own
`evaluate()` and `accumulate()` with `params.catIds` set to a group of categories, and the
parent puts each group's slices in their places along the category axis and runs the library's
`summarize()` on the whole: the arrays one process computes, hence the same twelve numbers,
bit for bit, with pycocotools and with faster-coco-eval (tests/test_parallel_cocoeval.py).

Why by category and not by image, although each image's evaluation is independent too: an
image split has to move every per-image evaluation into one process before accumulating. For
faster-coco-eval those are C++ objects whose pickling cost about three times what computing
them did (docs/SCALE.md); a category group's result is three small arrays. The price is that
one category is never split, so the heaviest (COCO's `person`, about 30% of the instances)
bounds the speedup; the groups start heaviest first, and docs/SCALE.md measures that bound.

Groups: each category is weighed by the work its evaluation takes (its detections and ground
truth, and the detection x ground-truth pairs within each image, where IoUs are computed); the
categories are dealt, heaviest first, to the lightest of TASKS_PER_WORKER x workers groups per
IoU type, and a pool of forked processes takes the groups of both IoU types, heaviest first.
The processes inherit the ground truth and the detections (nothing is pickled to them), run
one thread each (the processes are the parallelism), leave the terminal's Ctrl-C to their
parent and die with it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from train.interrupts import follow_parent, leave_terminal_signals_to_parent

TASKS_PER_WORKER = 2  # groups per IoU type and process: the pool evens out the estimates' errors; each costs a pass over the images
CATEGORY_AXIS = {"precision": 2, "recall": 1, "scores": 2}  # COCOeval.eval's arrays, [T, R, K, A, M] and [T, K, A, M]
MAX_DEFAULT_WORKERS = 16


@dataclass(frozen=True)
class Task:
    """One process's share: COCOeval of `iou_type` over these categories (COCO ids) and every image."""

    iou_type: str
    category_ids: tuple[int, ...]
    cost: float  # estimated work, in the units of `category_costs`


@dataclass(frozen=True)
class TaskTiming:
    task: Task
    cpu_s: float  # CPU seconds of the process that ran it


def default_workers() -> int:
    """One process per CPU this process may run on (its affinity: a Slurm or taskset share), at most
    MAX_DEFAULT_WORKERS: beyond that the heaviest category, never split, sets the time, and each
    process is one more fork of a trainer's large address space."""
    with contextlib.suppress(AttributeError, OSError):
        return min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS)
    return min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS)



def category_costs(coco_gt: Any, image_ids: np.ndarray, category_ids: np.ndarray) -> dict[int, float]:
    """Estimated evaluation work per category (COCO id): over images, detections + ground truth + their product.

    `image_ids` and `category_ids` hold one entry per detection. Each category also counts 1,
    so that categories without any data still spread over the groups.
    """
    categories = np.array(sorted(coco_gt.getCatIds()), dtype=np.int64)
    images = np.array(sorted(coco_gt.getImgIds()), dtype=np.int64)

    def counts(image_ids: np.ndarray, category_ids: np.ndarray) -> np.ndarray:
        known = np.isin(category_ids, categories) & np.isin(image_ids, images)
        cells = np.searchsorted(images, image_ids[known]) * len(categories) + np.searchsorted(categories, category_ids[known])
        return np.bincount(cells, minlength=len(images) * len(categories)).reshape(len(images), len(categories))

    annotations = coco_gt.dataset["annotations"]
    truth = counts(np.array([a["image_id"] for a in annotations], dtype=np.int64),
                   np.array([a["category_id"] for a in annotations], dtype=np.int64))
    detected = counts(np.asarray(image_ids, dtype=np.int64), np.asarray(category_ids, dtype=np.int64))
    work = (truth + detected + truth * detected).sum(axis=0) + 1
    return dict(zip(categories.tolist(), work.astype(float).tolist()))


def plan_tasks(costs: Mapping[int, float], iou_types: Sequence[str], workers: int) -> list[Task]:
    """Groups of categories per IoU type, heaviest task first; one group of all categories for one worker."""
    groups = 1 if workers <= 1 else min(len(costs), TASKS_PER_WORKER * workers)
    members: list[list[int]] = [[] for _ in range(groups)]
    loads = [0.0] * groups
    for category_id in sorted(costs, key=lambda c: (-costs[c], c)):  # longest processing time first
        lightest = loads.index(min(loads))
        members[lightest].append(category_id)
        loads[lightest] += costs[category_id]
    tasks = [Task(t, tuple(sorted(m)), load) for t in iou_types for m, load in zip(members, loads) if m]
    return sorted(tasks, key=lambda task: (-task.cost, task.iou_type != "segm"))  # segm IoUs cost more


def evaluate_group(cocoeval_class: Callable, coco_gt: Any, coco_dt: Any, task: Task) -> dict[str, np.ndarray]:
    """The library's evaluate() and accumulate() over the task's categories: its slices of COCOeval.eval."""
    evaluator = cocoeval_class(coco_gt, coco_dt, task.iou_type)
    evaluator.params.catIds = list(task.category_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    return {name: evaluator.eval[name] for name in CATEGORY_AXIS}


def run_tasks(
    tasks: Sequence[Task], run: Callable[[Task], dict[str, np.ndarray]], workers: int
) -> list[tuple[TaskTiming, dict[str, np.ndarray]]]:
    """`run` over the tasks: in this process for one worker, else in a pool of forked processes."""
    if workers <= 1 or len(tasks) <= 1:
        return [_timed(run, task) for task in tasks]
    pool = get_context("fork").Pool(min(workers, len(tasks)), initializer=_hold, initargs=(os.getpid(), run))
    with pool:  # leaving the block terminates the processes, also on an error or Ctrl-C
        return list(pool.imap(_run_held, tasks))  # handed out in order as processes free up, returned in order


def merged_cocoeval(
    cocoeval_class: Callable, coco_gt: Any, iou_type: str, parts: Sequence[tuple[Task, Mapping[str, np.ndarray]]]
) -> Any:
    """A COCOeval of every category whose `eval` holds the groups' slices in place: ready for `summarize()`."""
    evaluator = cocoeval_class(coco_gt, None, iou_type)
    params = evaluator.params
    params.catIds = sorted(set(params.catIds))
    position = {category_id: k for k, category_id in enumerate(params.catIds)}
    merged = {}
    for name, axis in CATEGORY_AXIS.items():
        shape = list(parts[0][1][name].shape)
        shape[axis] = len(params.catIds)
        merged[name] = np.full(shape, -1.0)  # COCOeval's value for a category without any result
        for task, arrays in parts:
            index = [slice(None)] * len(shape)
            index[axis] = [position[c] for c in task.category_ids]
            merged[name][tuple(index)] = arrays[name]
    evaluator.eval = {"params": copy.deepcopy(params), "counts": list(merged["precision"].shape), **merged}
    return evaluator


# The task runner of a pool process, set by the pool's initializer (fork: inherited, never pickled).
_held_runner: list[Callable[[Task], dict[str, np.ndarray]]] = []


def _hold(parent_pid: int, run: Callable[[Task], dict[str, np.ndarray]]) -> None:
    leave_terminal_signals_to_parent()  # the pool's terminate() sends SIGTERM
    follow_parent(parent_pid)
    _held_runner.append(run)


def _run_held(task: Task) -> tuple[TaskTiming, dict[str, np.ndarray]]:
    return _timed(_held_runner[0], task)


def _timed(run: Callable[[Task], dict[str, np.ndarray]], task: Task) -> tuple[TaskTiming, dict[str, np.ndarray]]:
    began = time.process_time()
    arrays = run(task)
    return TaskTiming(task, time.process_time() - began), arrays
