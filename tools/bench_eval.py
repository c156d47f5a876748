"""Benchmark: our COCO evaluation path against the straightforward one, on a generated set.

Both paths score the same generated detections (boxes, scores, labels, 28x28 mask
probabilities in the network-input frame) in one run. Ours: `COCOEvaluator` (box-sized
paste, RLE in worker processes, COCOeval split by category over processes, faster-coco-eval
by default). Reference: torchvision's full-image `paste_masks_in_image`, pycocotools encode
one mask at a time, pycocotools COCOeval. Prints the time of each, the ratio and both APs;
--json writes them too.

    python tools/bench_eval.py                                   # 5,000 images x 100 detections
    python tools/bench_eval.py --images 500 --dets-per-image 100 --json runs/bench_eval.json
    python tools/bench_eval.py --images 500 --backend pycocotools   # paste+encode gain alone
    python tools/bench_eval.py --ours-only                           # our path at full size
    python tools/bench_eval.py --ours-only --workers 1 2             # scaling: 1 and 2 processes, same set, one run
    python tools/bench_eval.py --ours-only --workers 1 2 --repeat 3  # the same, 3 interleaved rounds, medians
    python tools/bench_eval.py --ours-only --workers 2 --person-share 0.3 --project-workers 16

`--workers N ...`: our path once per N, given N cores (this process and every process it
starts are pinned to N of the CPUs it may use, as `taskset` would; all of them when N is
larger), with N encoding and N COCOeval processes, on the same detections (made before the
clock starts); the APs of every N must be equal to 6 decimals (they are equal bit for bit). Each run reports wall and CPU time (this process and its
workers) of the encoding phase (process() until every mask is encoded) and of scoring
(COCOeval). `--project-workers P` also scores with P processes and schedules the measured CPU
time of each of its tasks on P processes, heaviest first as the pool does: the scoring time P
cores would take, from this machine's per-task times. `--person-share`: the share of objects
(and of the detections made from them) in category 1, as COCO's `person` holds about 30% of
its instances, the one category heavier than 1/16 of the work (the split never divides one).

The workload: `make_eval_set` writes COCO ground truth (ellipse-shaped objects as polygons, some crowd
RLEs, some empty images; no JPEGs) and yields `(Batch, Detections)` pairs shaped like the
model's output: per image up to D detections, near-copies of the objects plus false
positives, with 28x28 mask probabilities, in the network-input frame. Detections are made
on demand from a per-image seed, so a 5,000 x 100 set never sits in memory.

`reference_results` is the straightforward path: torchvision's full-image
`paste_masks_in_image`, a threshold, and `pycocotools.mask.encode` one mask at a time, as in
torchvision's `references/detection/coco_eval.py`. The tests and this benchmark compare
`COCOEvaluator` against it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from model.detections import Detections
from pipeline.batch import Batch, resized_size
from tools import write_json
from train.evaluation import STAT_NAMES, COCOEvaluator, ImageResult, to_original_frame
from train.parallel_cocoeval import TaskTiming

MASK_SIZE = 28
IMAGE_SIZES = ((480, 640), (427, 640), (640, 480), (375, 500), (640, 427), (512, 512))
POLYGON_VERTICES = 24


@dataclass
class _ImageTruth:
    image_id: int
    height: int
    width: int
    ellipses: np.ndarray  # [N, 4] float64 (cx, cy, rx, ry) of the non-crowd objects
    labels: np.ndarray  # [N] contiguous labels 1..K


@dataclass
class EvalSet:
    """Ground truth on disk plus detections made on demand, image by image."""

    annotations_file: Path
    categories: list[dict[str, Any]]  # manifest style: {"id": contiguous, "coco_id", "name"}
    dets_per_image: int
    seed: int
    flip_fraction: float
    images: list[_ImageTruth]
    person_share: float = 0.0  # share of objects, and of the false detections, in category 1

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[tuple[Batch, Detections]]:
        for start in range(0, len(self.images), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self.images))))

    def batch(self, indices: Sequence[int]) -> tuple[Batch, Detections]:
        """The Batch and Detections of the images at `indices` (repeats allowed, as in padded batches)."""
        per_image = [self._detections(i) for i in indices]
        fields = {name: np.stack([d[name] for d in per_image]) for name in per_image[0]}
        return _batch(fields), Detections(
            boxes=torch.from_numpy(fields["boxes"]),
            scores=torch.from_numpy(fields["scores"]),
            labels=torch.from_numpy(fields["labels"]),
            mask_probs=torch.from_numpy(fields["mask_probs"]),
            num_detections=torch.from_numpy(fields["num_detections"]),
        )

    def _detections(self, index: int) -> dict[str, np.ndarray]:
        truth = self.images[index]
        rng = np.random.default_rng([self.seed, index, 1])
        num_classes = len(self.categories)
        # Near-copies of each object (the first one tight and confident), then false positives.
        copies = 1 + rng.poisson(1.5, size=len(truth.ellipses))
        ellipses = np.repeat(truth.ellipses, copies, axis=0)
        labels = np.repeat(truth.labels, copies)
        first = np.zeros(len(ellipses), dtype=bool)
        first[np.cumsum(copies) - copies] = True
        # Centres and radii move by a share of the radii: 5% for the first copy, 25% for the others.
        noise = np.where(first, 0.05, 0.25)[:, None] * rng.standard_normal((len(ellipses), 4))
        jittered = ellipses + noise * ellipses[:, [2, 3, 2, 3]]
        jittered[:, 2:] = np.maximum(jittered[:, 2:], 1.0)
        relabel = rng.random(len(labels)) < 0.1
        labels = np.where(relabel, _labels(rng, len(labels), num_classes, self.person_share), labels)
        scores = np.where(first, rng.uniform(0.5, 1.0, len(labels)), rng.uniform(0.05, 0.9, len(labels)))
        num_false = max(self.dets_per_image - len(labels), 0)
        false_ellipses = _random_ellipses(rng, num_false, truth.height, truth.width)
        ellipses = np.concatenate([jittered, false_ellipses])
        labels = np.concatenate([labels, _labels(rng, num_false, num_classes, self.person_share)])
        scores = np.concatenate([scores, rng.uniform(0.05, 0.6, num_false)])
        order = np.argsort(-scores, kind="stable")[: self.dets_per_image]
        boxes = _ellipse_boxes(ellipses[order], truth.height, truth.width)
        masks = _ellipse_mask_probs(ellipses[order], boxes, rng.uniform(2, 12, len(order)))
        return _pad_to_network_frame(
            rng, truth, boxes, scores[order], labels[order], masks, self.dets_per_image, self.flip_fraction
        )


def make_eval_set(
    out_dir: Path,
    num_images: int,
    dets_per_image: int,
    *,
    seed: int = 0,
    num_classes: int = 80,
    flip_fraction: float = 0.0,
    person_share: float = 0.0,
) -> EvalSet:
    """Write `instances_eval.json` under `out_dir` and return the set (ground truth + detection maker).

    `person_share`: the share of objects in category 1 (0: every category equally likely).
    """
    rng = np.random.default_rng(seed)
    categories = [{"id": k + 1, "coco_id": k + 1 + k // 9, "name": f"class{k + 1}"} for k in range(num_classes)]
    images, annotations, truths = [], [], []
    for index in range(num_images):
        image_id = 1000 + 100_000 * seed + 7 * index
        height, width = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        num_objects = 0 if rng.random() < 0.03 else int(rng.integers(1, 16))
        ellipses = _random_ellipses(rng, num_objects, height, width)
        labels = _labels(rng, num_objects, num_classes, person_share)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width})
        for ellipse, label in zip(ellipses, labels):
            annotations.append(_polygon_annotation(ellipse, categories[label - 1]["coco_id"], image_id, height, width))
        if rng.random() < 0.05:
            crowd = _random_ellipses(rng, 1, height, width)[0]
            annotations.append(_crowd_annotation(crowd, categories[0]["coco_id"], image_id, height, width))
        truths.append(_ImageTruth(image_id, height, width, ellipses, labels))
    for i, annotation in enumerate(annotations):
        annotation["id"] = i + 1
    coco_categories = [{"id": c["coco_id"], "name": c["name"], "supercategory": "thing"} for c in categories]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    annotations_file = out_dir / "instances_eval.json"
    annotations_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": coco_categories})
    )
    return EvalSet(annotations_file, categories, dets_per_image, seed, flip_fraction, truths, person_share)


def _labels(rng: np.random.Generator, count: int, num_classes: int, person_share: float) -> np.ndarray:
    """`count` labels in 1..num_classes: uniform, or category 1 with probability `person_share`, the rest uniform."""
    if not person_share:
        return rng.integers(1, num_classes + 1, count)
    person = rng.random(count) < person_share
    return np.where(person, 1, rng.integers(2, num_classes + 1, count))


def reference_encode_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> list[dict]:
    """Full-image paste with torchvision, threshold 0.5, then pycocotools encode one mask at a time."""
    masks = paste_masks_in_image(mask_probs[:, None], boxes, (height, width)) > 0.5
    rles = [mask_utils.encode(np.array(m[0, :, :, None].numpy(), dtype=np.uint8, order="F"))[0] for m in masks]
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def reference_results(batches: Iterator[tuple[Batch, Detections]], categories: list[dict]) -> dict[int, ImageResult]:
    """The straightforward path's per-image results (first occurrence of each image id kept)."""
    coco_ids = {c["id"]: c["coco_id"] for c in categories}
    results: dict[int, ImageResult] = {}
    for batch, detections in batches:
        boxes, paste, masks = to_original_frame(batch, detections)
        for i, image_id in enumerate(batch.image_ids.tolist()):
            n = int(detections.num_detections[i])
            if image_id in results:
                continue
            height, width = batch.original_sizes[i].tolist()
            xyxy = boxes[i, :n]
            results[image_id] = ImageResult(
                boxes_xywh=torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).numpy(),
                scores=detections.scores[i, :n].numpy(),
                category_ids=np.array([coco_ids[label] for label in detections.labels[i, :n].tolist()], dtype=np.int64),
                rles=reference_encode_masks(masks[i, :n], paste[i, :n], height, width),
            )
    return results


def run_benchmark(
    eval_set: EvalSet,
    *,
    batch_size: int = 16,
    backend: str = "faster",
    workers: Sequence[int] = (2,),
    repeat: int = 1,
    with_reference: bool = True,
    project_workers: int = 0,
) -> dict[str, Any]:
    """Time our evaluation path (once per entry of `workers`, the whole list `repeat` times, interleaved)
    and the reference one on the same set.

    Without the reference (`with_reference=False`) only our runs are measured; the reference
    keys are then None. `ours_s` is the median time of the last entry of `workers`, `scaling`
    the first entry's median over the last's, and `ap_ours` the last run's.
    """
    batches = list(eval_set.batches(batch_size))  # made before any clock starts
    order = [n for _ in range(repeat) for n in workers]
    runs = [_time_ours(eval_set, batches, backend, n, keep_results=k == len(order) - 1) for k, n in enumerate(order)]
    results_ours = runs[-1].pop("results")
    median_s = {n: statistics.median(run["seconds"] for run in runs if run["workers"] == n) for n in workers}
    figures: dict[str, Any] = {
        "images": len(eval_set),
        "dets_per_image": eval_set.dets_per_image,
        "person_share": eval_set.person_share,
        "backend": backend,
        "runs": runs,
        "median_s": {str(n): seconds for n, seconds in median_s.items()},
        "ours_s": median_s[workers[-1]],
        "ap_ours": {t: m["AP"] for t, m in runs[-1]["metrics"].items()},
        "equal_across_workers": all(run["metrics"] == runs[0]["metrics"] for run in runs),
        "reference_s": None,
        "speedup": None,
        "ap_reference": None,
    }
    if len(workers) > 1:
        figures["scaling"] = median_s[workers[0]] / median_s[workers[-1]]
    if project_workers:
        figures["projection"] = _project(eval_set, results_ours, backend, project_workers)
    if not with_reference:
        return figures
    reference_s, metrics_reference, results_reference = _time_reference(eval_set, batches)
    metrics_ours = runs[-1]["metrics"]
    pairs = [(a, b) for image_id, r in results_ours.items() for a, b in zip(r.rles, results_reference[image_id].rles)]
    return {
        **figures,
        "reference_s": reference_s,
        "speedup": reference_s / figures["ours_s"],
        "ap_reference": {t: m["AP"] for t, m in metrics_reference.items()},
        "max_stat_difference": max(
            abs(metrics_ours[t][k] - metrics_reference[t][k]) for t in metrics_ours for k in metrics_ours[t]
        ),
        "masks": len(pairs),
        "identical_rles": sum(a["counts"] == b["counts"] for a, b in pairs),
    }


def _cpu_s() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its ended, reaped children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@contextlib.contextmanager
def _given_cores(count: int) -> Iterator[int]:
    """Pin this process (and what it forks meanwhile) to `count` of its CPUs; yields how many it got."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:count])
    try:
        yield min(count, len(allowed))
    finally:
        os.sched_setaffinity(0, allowed)


def _time_ours(eval_set: EvalSet, batches: list, backend: str, workers: int, keep_results: bool) -> dict[str, Any]:
    """One run of our path on `workers` cores with `workers` encoding and `workers` COCOeval processes.

    Each run is a process forked from this one with the detections made, so every run starts from
    the same state: run in this process, the second of two runs took 7-12% more CPU than the same
    run first (half a million freed mask copies and the first run's results in its memory).
    `keep_results`: send the per-image results back too (for the comparisons), not only the figures.
    """
    receiver, sender = get_context("fork").Pipe(duplex=False)
    child = get_context("fork").Process(
        target=_run_in_child, args=(sender, eval_set, batches, backend, workers, keep_results), name=f"bench-{workers}"
    )
    child.start()
    sender.close()
    try:
        figures = receiver.recv()
    except EOFError:
        figures = None
    child.join()
    if figures is None:
        raise SystemExit(f"bench_eval: the run with {workers} worker(s) ended with exit code {child.exitcode} "
                         "without its figures (its error is above)")
    return figures


def _run_in_child(sender: Connection, eval_set: EvalSet, batches: list, backend: str, workers: int, keep_results: bool) -> None:
    with _given_cores(workers) as cores:
        figures = {"cores": cores, **_run_ours(eval_set, batches, backend, workers)}
    if not keep_results:
        del figures["results"]
    sender.send(figures)
    sender.close()


def _run_ours(eval_set: EvalSet, batches: list, backend: str, workers: int) -> dict[str, Any]:
    cpu_start, wall_start = _cpu_s(), time.perf_counter()
    ours = COCOEvaluator(
        eval_set.annotations_file, eval_set.categories, backend=backend, num_workers=workers, scoring_workers=workers
    )
    for batch, detections in batches:
        ours.process(batch, detections)
    results = ours.results()
    ours.close()  # the encoding workers end here, so that their CPU time is counted apart from scoring
    cpu_encoded, wall_encoded = _cpu_s(), time.perf_counter()
    metrics = ours.evaluate()
    cpu_end, wall_end = _cpu_s(), time.perf_counter()
    return {
        "workers": workers,
        "seconds": wall_end - wall_start,
        "cpu_s": sum(cpu_end) - sum(cpu_start),
        "main_cpu_s": cpu_end[0] - cpu_start[0],  # this process: feeding the encoders, collecting, merging
        "encode_s": wall_encoded - wall_start,
        "encode_cpu_s": sum(cpu_encoded) - sum(cpu_start),
        "score_s": wall_end - wall_encoded,
        "score_cpu_s": sum(cpu_end) - sum(cpu_encoded),
        "tasks": [_task_figures(t) for t in ours.task_timings],
        "metrics": metrics,
        "results": results,
    }


def _task_figures(timing: TaskTiming) -> dict[str, Any]:
    return {"iou_type": timing.task.iou_type, "categories": len(timing.task.category_ids), "cpu_s": timing.cpu_s}


def _project(eval_set: EvalSet, results: dict[int, ImageResult], backend: str, workers: int) -> dict[str, Any]:
    """Plan the scoring for `workers` processes, run its tasks on the cores this process has (more
    processes than cores would inflate each task's CPU time), then schedule each task's measured
    CPU time on `workers` cores."""
    scorer = COCOEvaluator(eval_set.annotations_file, eval_set.categories, backend=backend, scoring_workers=workers)
    scorer.cocoeval(results, processes=len(os.sched_getaffinity(0)))
    cpu = [timing.cpu_s for timing in scorer.task_timings]  # in the order the pool hands them out, heaviest first
    finish = [0.0] * workers
    for seconds in cpu:
        earliest = finish.index(min(finish))
        finish[earliest] += seconds
    return {"workers": workers, "tasks": len(cpu), "task_cpu_s": sum(cpu), "longest_task_s": max(cpu),
            "makespan_s": max(finish)}


def _time_reference(eval_set: EvalSet, batches: list) -> tuple[float, dict, dict]:
    start = time.perf_counter()
    reference = COCOEvaluator(eval_set.annotations_file, eval_set.categories, backend="pycocotools", num_workers=0)
    results = reference_results(iter(batches), eval_set.categories)
    metrics = reference.score([results])
    return time.perf_counter() - start, metrics, results


def _random_ellipses(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """(cx, cy, rx, ry) with COCO-like sizes (log-uniform radii), inside the image."""
    limit = min(height, width) / 2.2
    radii = np.exp(rng.uniform(np.log(3.0), np.log(limit), (count, 1))) * rng.uniform(0.5, 1.0, (count, 2))
    cx = rng.uniform(radii[:, 0], width - radii[:, 0])
    cy = rng.uniform(radii[:, 1], height - radii[:, 1])
    return np.stack([cx, cy, radii[:, 0], radii[:, 1]], axis=1)


def _ellipse_polygon(ellipse: np.ndarray) -> list[float]:
    angles = np.linspace(0, 2 * np.pi, POLYGON_VERTICES, endpoint=False)
    cx, cy, rx, ry = ellipse
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1).ravel().round(2).tolist()


def _polygon_annotation(ellipse: np.ndarray, category_id: int, image_id: int, height: int, width: int) -> dict:
    polygon = _ellipse_polygon(ellipse)
    xs, ys = polygon[0::2], polygon[1::2]
    rle = mask_utils.frPyObjects([polygon], height, width)[0]
    return {
        "image_id": image_id,
        "category_id": int(category_id),
        "segmentation": [polygon],
        "area": float(mask_utils.area(rle)),
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        "iscrowd": 0,
    }


def _crowd_annotation(ellipse: np.ndarray, category_id: int, image_id: int, height: int, width: int) -> dict:
    rle = mask_utils.frPyObjects([_ellipse_polygon(ellipse)], height, width)[0]
    return {
        "image_id": image_id,
        "category_id": int(category_id),
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": mask_utils.toBbox(rle).tolist(),
        "iscrowd": 1,
    }


def _ellipse_boxes(ellipses: np.ndarray, height: int, width: int) -> np.ndarray:
    cx, cy, rx, ry = ellipses.T
    boxes = np.stack([cx - rx, cy - ry, cx + rx, cy + ry], axis=1)
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)


def _ellipse_mask_probs(ellipses: np.ndarray, boxes: np.ndarray, sharpness: np.ndarray) -> np.ndarray:
    """Soft ellipse masks sampled at the 28x28 cell centres of each box: what a mask head might say."""
    cells = (np.arange(MASK_SIZE) + 0.5) / MASK_SIZE
    x = boxes[:, 0, None] + cells * (boxes[:, 2] - boxes[:, 0])[:, None]  # [N, 28]
    y = boxes[:, 1, None] + cells * (boxes[:, 3] - boxes[:, 1])[:, None]
    cx, cy, rx, ry = (ellipses[:, i, None] for i in range(4))
    inside = 1 - ((x - cx) / rx)[:, None, :] ** 2 - ((y - cy) / ry)[:, :, None] ** 2  # [N, 28(y), 28(x)]
    return (0.5 + 0.5 * np.tanh(0.5 * sharpness[:, None, None] * inside)).astype(np.float32)  # the logistic


def _pad_to_network_frame(
    rng: np.random.Generator,
    truth: _ImageTruth,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    capacity: int,
    flip_fraction: float,
) -> dict[str, np.ndarray]:
    """One image's detections as the model returns them: resized like the pipeline, maybe flipped, padded to D."""
    resized = resized_size(truth.height, truth.width, 800, 1333)  # the reference's sizes, by the pipeline's rule
    scales = np.array([resized[0] / truth.height, resized[1] / truth.width], dtype=np.float32)
    boxes = boxes * np.array([scales[1], scales[0], scales[1], scales[0]], dtype=np.float32)
    flipped = rng.random() < flip_fraction
    if flipped:
        boxes = np.stack([resized[1] - boxes[:, 2], boxes[:, 1], resized[1] - boxes[:, 0], boxes[:, 3]], axis=1)
        masks = masks[:, :, ::-1]
    n = len(boxes)
    padded = {
        "boxes": np.zeros((capacity, 4), np.float32),
        "scores": np.zeros(capacity, np.float32),
        "labels": np.zeros(capacity, np.int64),
        "mask_probs": np.zeros((capacity, MASK_SIZE, MASK_SIZE), np.float32),
    }
    for name, value in zip(padded, (boxes, scores, labels, masks)):
        padded[name][:n] = value
    return {
        **padded,
        "num_detections": np.array(n, np.int32),
        "image_ids": np.array(truth.image_id, np.int64),
        "image_sizes": np.array(resized, np.int32),
        "original_sizes": np.array([truth.height, truth.width], np.int32),
        "scales": scales,
        "flipped": np.array(flipped),
    }


def _batch(fields: dict[str, np.ndarray]) -> Batch:
    size = len(fields["image_ids"])
    return Batch(
        images=torch.zeros(size, 3, 32, 32, dtype=torch.uint8),
        image_sizes=torch.from_numpy(fields["image_sizes"]),
        original_sizes=torch.from_numpy(fields["original_sizes"]),
        scales=torch.from_numpy(fields["scales"]),
        flipped=torch.from_numpy(fields["flipped"]),
        image_ids=torch.from_numpy(fields["image_ids"]),
        boxes=torch.zeros(size, 0, 4),
        labels=torch.zeros(size, 0, dtype=torch.int64),
        num_boxes=torch.zeros(size, dtype=torch.int32),
        verts=torch.zeros(size, 0, 2),
        polys=torch.zeros(size, 0, 3, dtype=torch.int32),
        num_polys=torch.zeros(size, dtype=torch.int32),
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="generated val images (val2017 has 5,000)")
    parser.add_argument("--dets-per-image", type=int, default=100, help="detections per image, each with a mask")
    parser.add_argument("--batch-size", type=int, default=16, help="images per process() call")
    parser.add_argument("--backend", choices=("pycocotools", "faster"), default="faster", help="COCOeval of our path")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[2],
        help="our path's processes, encoding and COCOeval each; several values: one run each, same detections",
    )
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the --workers list this many times, interleaved; times are the medians (default: 1)")
    parser.add_argument("--project-workers", type=int, default=0, metavar="P",
                        help="also schedule the measured COCOeval tasks of P processes on P cores")
    parser.add_argument("--person-share", type=float, default=0.0,
                        help="share of the objects in category 1, like COCO's person (about 0.3); 0: uniform")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated set")
    parser.add_argument("--ours-only", action="store_true", help="time our path alone (the reference takes hours at full size)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def main(args: argparse.Namespace) -> dict:
    if min(args.workers) < 1 or min(args.images, args.dets_per_image, args.repeat) < 1 or args.project_workers < 0:
        raise SystemExit("bench_eval: --workers, --images, --dets-per-image and --repeat take counts of at least 1, "
                         "--project-workers one of at least 0")
    if not 0.0 <= args.person_share <= 1.0:
        raise SystemExit(f"bench_eval: --person-share is a share between 0 and 1, not {args.person_share}")
    with tempfile.TemporaryDirectory() as tmp:
        eval_set = make_eval_set(Path(tmp), args.images, args.dets_per_image, seed=args.seed, person_share=args.person_share)
        figures = run_benchmark(
            eval_set,
            batch_size=args.batch_size,
            backend=args.backend,
            workers=args.workers,
            repeat=args.repeat,
            with_reference=not args.ours_only,
            project_workers=args.project_workers,
        )
    print(f"\n{figures['images']} images x {figures['dets_per_image']} detections ({args.backend}):")
    for run in figures["runs"]:
        print(
            f"  ours, {run['workers']} worker(s) on {run['cores']} core(s): {run['seconds']:.1f} s (CPU {run['cpu_s']:.1f} s, {run['main_cpu_s']:.1f} s of it "
            f"in the main process); "
            f"encoding {run['encode_s']:.1f} s (CPU {run['encode_cpu_s']:.1f} s), "
            f"COCOeval {run['score_s']:.1f} s (CPU {run['score_cpu_s']:.1f} s); "
            f"AP bbox {run['metrics']['bbox']['AP']:.6f}, segm {run['metrics']['segm']['AP']:.6f}"
        )
    if args.repeat > 1:
        print("  medians: " + ", ".join(f"{n} worker(s) {seconds:.1f} s" for n, seconds in figures["median_s"].items()))
    if "scaling" in figures:
        print(f"  {args.workers[0]} -> {args.workers[-1]} workers: "
              f"{figures['scaling']:.2f}x; all {len(STAT_NAMES) * 2} stats equal: {figures['equal_across_workers']}")
    if "projection" in figures:
        projection = figures["projection"]
        print(f"  COCOeval on {projection['workers']} cores (measured tasks, scheduled): {projection['makespan_s']:.1f} s "
              f"for {projection['task_cpu_s']:.1f} CPU s in {projection['tasks']} tasks, the longest {projection['longest_task_s']:.1f} s")
    if not args.ours_only:
        print(f"  reference {figures['reference_s']:.1f} s, speedup {figures['speedup']:.1f}x")
        for iou_type in ("bbox", "segm"):
            print(f"  {iou_type} AP: ours {figures['ap_ours'][iou_type]:.6f}, reference {figures['ap_reference'][iou_type]:.6f}")
        print(
            f"  largest difference over all 24 stats: {figures['max_stat_difference']:.2e}; "
            f"identical RLEs: {figures['identical_rles']} of {figures['masks']}"
        )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
