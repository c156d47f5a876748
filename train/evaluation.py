"""COCO box and mask evaluation: reset/process/evaluate, exact to the official COCO API.

`COCOEvaluator.process` maps each batch's detections back to original image pixels
(undoing the resize and any flip), turns labels into COCO category ids, and hands the masks
to worker processes that RLE-encode them from box-sized masks (`train.mask_encoding`), so
the inference loop never waits on encoding. `evaluate` gathers every rank's results on
rank 0, keeps one result per image id (padded last batches repeat images), runs COCOeval for
`bbox` and `segm` with pycocotools (the official API) or faster-coco-eval (same numbers,
faster), split by category over `scoring_workers` processes with one process's numbers
(`train.parallel_cocoeval`), prints the usual table and returns the 12 COCO stats of each type
on every rank.
Evaluation beside training (train/async_evaluation.py) takes the same steps one at a time:
`inference_on_dataset(score=False)`, `take_results`, `encoding_futures` / `collect_encodings`,
`gather_to_main`, `merge_ranks`, `score`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.box_ops import inclusive_boxes
from model.detections import Detections
from pipeline.batch import Batch, flip_boxes
from pipeline.coco_masks import scoring_refusal
from pipeline.shard_format import file_sha256, read_manifest
from train.config_schema import EVAL_BACKENDS as BACKENDS
from train.mask_encoding import encode_images, init_worker
from train.metrics import format_duration
from train.parallel_cocoeval import (
    TaskTiming,
    category_costs,
    default_workers,
    evaluate_group,
    merged_cocoeval,
    plan_tasks,
    run_tasks,
)
from train.throughput import synchronize

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
GEOMETRY = {"bbox": "bbox", "segm": "segmentation"}  # the results entries' field each IoU type scores
MAX_PENDING_PER_WORKER = 64  # images queued for encoding before process() waits (bounds host memory)
PROGRESS_EVERY_S = 30.0  # a progress line while inference runs


class EvaluationError(RuntimeError):
    """Evaluation inputs that do not fit together (weights, shards, annotations); the message says how to fix it."""


@dataclass
class ImageResult:
    """One image's detections in COCO terms: original pixels, COCO category ids, RLE masks."""

    boxes_xywh: np.ndarray  # [N, 4] float32
    scores: np.ndarray  # [N] float32
    category_ids: np.ndarray  # [N] int64
    rles: list[dict] | Future  # N COCO RLEs (a Future while a worker encodes them)


def check_annotations_match(annotations_file: str | Path, manifest: Mapping[str, Any]) -> None:
    """Raise EvaluationError unless `annotations_file` is the file the shards were made from."""
    expected = manifest.get("annotations_sha256")
    if expected is not None and file_sha256(Path(annotations_file)) != expected:
        raise EvaluationError(
            f"{annotations_file} is not the annotation file these shards were made from (sha256 differs "
            f"from the manifest); pass the instances JSON given to tools/shard_coco.py"
        )


def to_original_frame(batch: Batch, detections: Detections) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes [B, D, 4] in original image pixels, the boxes to paste the masks into, and mask
    probabilities [B, D, M, M] in unflipped boxes.

    Undoes the flip in the network-input frame (x -> W - x, W the resized width), then the resize.
    With `detections.inclusive` as the reference does (its `BoxList.resize` to the image's size,
    then `Masker`): the inclusive boxes (x2 - 1, y2 - 1) scaled by original / resized, and the
    masks pasted into those; otherwise the continuous boxes, and the masks pasted into them.
    """
    boxes = detections.boxes.float()
    width = batch.image_sizes[:, 1].to(boxes)[:, None]
    flipped = batch.flipped.to(boxes.device)
    boxes = torch.where(flipped[:, None, None], flip_boxes(boxes, width), boxes)
    if detections.inclusive:
        ratio = (batch.original_sizes.double() / batch.image_sizes.double()).float().to(boxes.device)
        paste = inclusive_boxes(boxes) * ratio[:, None, [1, 0, 1, 0]]
        boxes = paste + paste.new_tensor([0.0, 0.0, 1.0, 1.0])
    else:
        sy, sx = batch.scales.to(boxes).unbind(-1)
        boxes = paste = boxes / torch.stack([sx, sy, sx, sy], dim=-1)[:, None, :]
    # A flipped image's masks are mirrored inside their boxes. Evaluation never flips, so the pass
    # over every mask is skipped then (it cost 3 ms an image on a CPU); the callers copy the
    # masks to the host right after, so asking the device costs no extra wait.
    masks = detections.mask_probs.float()
    if flipped.any():
        masks = torch.where(flipped[:, None, None, None], masks.flip(-1), masks)
    return boxes, paste, masks


class COCOEvaluator:
    """Accumulates detections over a pass of the val set and scores them with COCOeval."""

    def __init__(
        self,
        annotations_file: str | Path,
        categories: Sequence[Mapping[str, Any]],
        *,
        backend: str = "pycocotools",
        num_workers: int = 2,
        scoring_workers: int = 1,
        mask_threshold: float = 0.5,
        max_pending_per_worker: int | None = MAX_PENDING_PER_WORKER,
        tables: bool = True,
    ):
        """`num_workers`: processes encoding masks (0: in this process); `scoring_workers`: processes running
        COCOeval (0: one per CPU this process may use, at most 16). `tables`: print COCOeval's result table (tools); the
        trainer prints one line per epoch instead (every statistic is in its metrics.jsonl)."""
        if backend not in BACKENDS:
            raise EvaluationError(f"unknown COCO evaluation backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.annotations_file = Path(annotations_file)
        self.backend = backend
        self.num_workers = num_workers
        self.scoring_workers = scoring_workers or default_workers()
        self.mask_threshold = mask_threshold
        self.tables = tables
        # None: the pass's masks may all wait for the workers (evaluation beside training, train/async_evaluation.py)
        self.max_pending_per_worker = max_pending_per_worker
        self._coco_gt = _load_ground_truth(self.annotations_file, backend)
        self._label_to_category = _category_lookup(categories, self._coco_gt, self.annotations_file)
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[tuple[Future, int]] = deque()  # encoding tasks and their image counts
        self.task_timings: list[TaskTiming] = []  # CPU time of each COCOeval task of the last scoring (benchmarks)
        # after scoring: iou type -> each category's AP (tools/evaluate.py prints and saves them)
        self.per_category: dict[str, list[dict[str, Any]]] = {}
        self.reset()

    @classmethod
    def for_shards(cls, annotations_file: str | Path, shard_dir: str | Path, **kwargs: Any) -> "COCOEvaluator":
        """An evaluator for a shard folder: its manifest supplies the categories and the annotations' sha256."""
        manifest = read_manifest(Path(shard_dir))
        check_annotations_match(annotations_file, manifest)
        return cls(annotations_file, manifest["categories"], **kwargs)

    def reset(self) -> None:
        self._images: dict[int, ImageResult] = {}
        self.gathered: dict[int, ImageResult] = {}  # after evaluate(), on rank 0: every rank's results

    def process(self, batch: Batch, detections: Detections) -> None:
        """Record one batch's detections (network-input frame) in original-image COCO terms."""
        counts = detections.num_detections.tolist()
        boxes, paste, masks = to_original_frame(batch, detections)
        # One copy of each tensor to the host for the whole batch.
        boxes, paste = boxes.cpu().numpy(), paste.cpu().numpy()
        masks = masks.cpu().numpy()
        scores = detections.scores.float().cpu().numpy()
        category_ids = self._label_to_category[detections.labels.cpu().numpy()]
        image_ids = batch.image_ids.tolist()
        heights, widths = batch.original_sizes.cpu().numpy().T.tolist()
        kept, work = [], []
        for i, image_id in enumerate(image_ids):
            if image_id in self._images:  # a repeat from a padded last batch
                continue
            n = counts[i]
            self._images[image_id] = ImageResult(xyxy_to_xywh(boxes[i, :n]), scores[i, :n].copy(), category_ids[i, :n].copy(), [])
            kept.append(image_id)
            work.append((masks[i, :n], paste[i, :n], heights[i], widths[i]))
        for image_id, rles in zip(kept, self._encode(work)):
            self._images[image_id].rles = rles

    def results(self) -> dict[int, ImageResult]:
        """This process's results, image id -> ImageResult, with every worker's RLEs collected."""
        self._pending.clear()
        return collect_encodings(self._images)

    def take_results(self) -> dict[int, ImageResult]:
        """This pass's results as they stand (RLEs may still be Futures) and an empty evaluator for the next pass."""
        taken = self._images
        self._pending.clear()
        self.reset()
        return taken

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Gather all ranks' results on rank 0, score them, and return the metrics on every rank."""
        per_rank = gather_to_main(self.results())
        metrics = None
        if per_rank is not None:
            self.gathered = merge_ranks(per_rank)
            metrics = self._score_merged(self.gathered)
        if dist.is_available() and dist.is_initialized():
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def score(self, per_rank: Sequence[Mapping[int, ImageResult]]) -> dict[str, dict[str, float]]:
        """COCO metrics of the union of some ranks' results, one result per image id (first one wins)."""
        return self._score_merged(merge_ranks(per_rank))

    def _score_merged(self, merged: Mapping[int, ImageResult]) -> dict[str, dict[str, float]]:
        self._check_image_ids(merged)
        return {
            iou_type: {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
            for iou_type, evaluator in self.cocoeval(merged).items()
        }

    def close(self) -> None:
        """Stop the encoding workers (they are otherwise kept for the next evaluation)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "COCOEvaluator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _encode(self, work: list[tuple[np.ndarray, np.ndarray, int, int]]) -> list[list[dict]] | list[Future]:
        """Each image's RLEs, or a Future of them per image: one worker task per batch. A task per image
        cost a wake-up and a message per image on both sides: at 5,000 images on 2 cores the main
        process spent 6.0 CPU s instead of 4.9, and the evaluation 32.3 s instead of 30.7-31.3 (docs/SCALE.md)."""
        if self.num_workers == 0:
            return encode_images(work, self.mask_threshold)
        if not work:
            return []
        if self._pool is None:
            # fork, like DataLoader workers: a spawned worker spends seconds importing torch, and
            # these workers only run CPU code (never CUDA, which a forked child cannot use).
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=get_context("fork"), initializer=init_worker)
        limit = None if self.max_pending_per_worker is None else self.max_pending_per_worker * self.num_workers
        while limit is not None and self._pending and sum(n for _, n in self._pending) + len(work) > limit:
            self._pending.popleft()[0].result()
        task = self._pool.submit(encode_images, work, self.mask_threshold)
        self._pending.append((task, len(work)))
        return per_image_futures(task, len(work))

    def _check_image_ids(self, merged: Mapping[int, ImageResult]) -> None:
        known = set(self._coco_gt.getImgIds())
        unknown = merged.keys() - known
        if unknown:
            raise EvaluationError(
                f"{len(unknown)} evaluated images (e.g. id {min(unknown)}) are not in {self.annotations_file}; "
                f"pass the annotation file these shards were made from"
            )
        if len(merged) < len(known):
            print(
                f"evaluating {len(merged)} of the {len(known)} images in {self.annotations_file}; "
                f"the other {len(known) - len(merged)} count as images without detections"
            )

    def cocoeval(self, merged: Mapping[int, ImageResult], processes: int | None = None) -> dict[str, Any]:
        """Summarized COCOeval objects (`eval` arrays, `stats`) of each IoU type, over `scoring_workers` processes.

        `processes`: run the tasks planned for `scoring_workers` on this many processes instead
        (tools/bench_eval.py measures each task of a 16-process plan on the cores it has).
        """
        cocoeval_class = _coco_api(self.backend)[1]
        table = DetectionTable.of(merged)  # before the processes fork, which inherit it
        tasks = plan_tasks(category_costs(self._coco_gt, table.image_ids, table.category_ids), IOU_TYPES, self.scoring_workers)

        def run(task):
            entries = table.entries(geometry=(GEOMETRY[task.iou_type],), category_ids=task.category_ids)
            with quiet():  # the API's progress chatter; the result tables are printed below
                return evaluate_group(cocoeval_class, self._coco_gt, _load_results(self._coco_gt, entries), task)

        processes = processes or self.scoring_workers
        if self.tables:
            used = min(processes, len(tasks))
            print(
                f"COCOeval bbox and segm ({self.backend}, {used} process{'es' * (used > 1)}): matching "
                f"{len(table.scores)} detections on {len(merged)} images ...", flush=True,
            )
        start = time.perf_counter()
        done = run_tasks(tasks, run, processes)
        self.task_timings = [timing for timing, _ in done]
        evaluators = {}
        for iou_type in IOU_TYPES:
            parts = [(timing.task, arrays) for timing, arrays in done if timing.task.iou_type == iou_type]
            evaluators[iou_type] = merged_cocoeval(cocoeval_class, self._coco_gt, iou_type, parts)
            categories = self._coco_gt.loadCats(evaluators[iou_type].params.catIds)
            self.per_category[iou_type] = per_category_ap(evaluators[iou_type], categories)
            if self.tables:
                print(f"COCO {iou_type} ({self.backend}, {time.perf_counter() - start:.1f} s for both types):")
                evaluators[iou_type].summarize()
            else:
                with quiet():
                    evaluators[iou_type].summarize()  # computes the stats
        return evaluators


def per_category_ap(evaluator: Any, categories: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each category's AP@[.5:.95] (all areas, 100 detections), as COCOeval's first statistic averages it.

    `categories`: the COCO entries of `evaluator.params.catIds`, in that order. A category without
    ground truth has no AP (None), as detectron2 reports it (nan there).
    """
    precision = evaluator.eval["precision"]  # [IoU thresholds, recalls, categories, areas, max detections]
    rows = []
    for k, category in enumerate(categories):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        rows.append({"category_id": int(category["id"]), "name": category["name"],
                     "AP": float(values.mean()) if values.size else None})
    return rows


def per_image_futures(task: Future, count: int) -> list[Future]:
    """One Future per image of an encoding task whose result is the list of each image's RLEs."""
    futures = [Future() for _ in range(count)]

    def settle(done: Future) -> None:
        if done.cancelled():
            for future in futures:
                future.cancel()
        elif done.exception() is not None:
            for future in futures:
                future.set_exception(done.exception())
        else:
            for future, rles in zip(futures, done.result()):
                future.set_result(rles)

    task.add_done_callback(settle)
    return futures


def encoding_futures(results: Mapping[int, ImageResult]) -> list[Future]:
    """The Futures of the RLEs in `results` that are still the workers' (`collect_encodings` replaces them)."""
    return [result.rles for result in results.values() if isinstance(result.rles, Future)]


def collect_encodings(results: dict[int, ImageResult]) -> dict[int, ImageResult]:
    """`results` with each worker's RLEs in place of its Future (waits for them; raises a worker's error)."""
    for result in results.values():
        if isinstance(result.rles, Future):
            result.rles = result.rles.result()
    return results


def merge_ranks(per_rank: Sequence[Mapping[int, ImageResult]]) -> dict[int, ImageResult]:
    """One result per image id over all ranks; repeats (padded batches) are identical, the first is kept."""
    merged: dict[int, ImageResult] = {}
    for results in per_rank:
        for image_id, result in results.items():
            merged.setdefault(image_id, result)
    return merged


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] corners (x1, y1, x2, y2) -> COCO's (x, y, width, height)."""
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def coco_results(results: Mapping[int, ImageResult], geometry: Sequence[str] = ("bbox", "segmentation")) -> list[dict]:
    """A COCO results file's entries, one per detection, with the `geometry` fields asked for.

    A results file holds both `bbox` and `segmentation`; COCOeval of one type gets only that
    one's (`GEOMETRY`). The dicts are fresh: pycocotools' loadRes adds fields to them.
    """
    return DetectionTable.of(results).entries(geometry)


@dataclass
class DetectionTable:
    """Every detection of a pass as one column per field, in results order (images, then detections).

    Built once per scoring, so that each COCOeval task picks its categories' entries with one
    array operation instead of a pass over every image.
    """

    image_ids: np.ndarray  # [D] int64
    category_ids: np.ndarray  # [D] int64, COCO ids
    scores: np.ndarray  # [D] float32
    boxes_xywh: np.ndarray  # [D, 4] float32
    rles: list[dict]  # D COCO RLEs

    @classmethod
    def of(cls, results: Mapping[int, ImageResult]) -> "DetectionTable":
        parts = list(results.values())
        return cls(
            image_ids=np.repeat(np.array(list(results), dtype=np.int64), [len(r.scores) for r in parts]),
            category_ids=np.concatenate([r.category_ids for r in parts] or [np.zeros(0, np.int64)]),
            scores=np.concatenate([r.scores for r in parts] or [np.zeros(0, np.float32)]),
            boxes_xywh=np.concatenate([r.boxes_xywh.reshape(-1, 4) for r in parts] or [np.zeros((0, 4), np.float32)]),
            rles=[rle for r in parts for rle in r.rles],
        )

    def entries(self, geometry: Sequence[str] = ("bbox", "segmentation"), category_ids: Sequence[int] | None = None) -> list[dict]:
        """Results entries with the `geometry` fields; `category_ids`: only these COCO categories' detections."""
        kept = np.arange(len(self.scores)) if category_ids is None else np.flatnonzero(np.isin(self.category_ids, category_ids))
        columns = [self.boxes_xywh[kept].tolist() if name == "bbox" else [self.rles[i] for i in kept.tolist()] for name in geometry]
        return [
            {"image_id": image_id, "category_id": category_id, **dict(zip(geometry, values)), "score": score}
            for image_id, category_id, score, *values in zip(
                self.image_ids[kept].tolist(), self.category_ids[kept].tolist(), self.scores[kept].tolist(), *columns
            )
        ]


def inference_on_dataset(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    evaluator: COCOEvaluator,
    *,
    num_warmup: int = 5,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    score: bool = True,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> dict[str, dict[str, float]] | None:
    """Run `model` in eval mode over `loader` under `autocast`, feed `evaluator`, and return its metrics.

    With `score=False` the pass's results stay in the evaluator, unscored (`take_results()`
    hands them to evaluation beside training), and None is returned.

    `autocast` is the training precision's context (train.engine.autocast_context). In eval mode
    the model runs eagerly, never from the training step's CUDA graphs (model/maskrcnn.py).
    The model's train/eval mode is restored afterwards. A progress line (batches done, images/s,
    ETA) is printed every `progress_every_s` seconds. The final throughput leaves out the first
    `num_warmup` batches (allocator growth, cudnn autotuning).
    """
    evaluator.reset()
    was_training = model.training
    model.eval()
    num_batches = num_images = num_timed = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    first = start = last_report = time.perf_counter()
    try:
        with torch.inference_mode(), autocast():
            for step, batch in enumerate(loader):
                if step == num_warmup:
                    synchronize(batch.images.device)
                    start, num_timed = time.perf_counter(), 0
                evaluator.process(batch, model(batch))
                num_batches += 1
                num_images += len(batch)
                num_timed += len(batch)
                now = time.perf_counter()
                if now - last_report >= progress_every_s:
                    last_report = now
                    print(_progress_line(num_batches, total, num_images, now - first), flush=True)
            if num_batches:
                synchronize(batch.images.device)
    finally:
        model.train(was_training)
    end = time.perf_counter()
    warmup = f" after {num_warmup} warm-up batches" if num_batches > num_warmup else ""
    print(
        f"inference: {num_images} images (padded repeats included) in {num_batches} batches, {end - first:.1f} s; "
        f"{num_timed / max(end - start, 1e-9):.1f} images/s{warmup}"
    )
    return evaluator.evaluate() if score else None


def _progress_line(batches: int, total: int | None, images: int, seconds: float) -> str:
    rate = images / max(seconds, 1e-9)
    if total is None:
        return f"inference: {batches} batches, {images} images, {rate:.1f} images/s"
    eta = (total - batches) * seconds / batches
    return f"inference: {batches}/{total} batches, {images} images, {rate:.1f} images/s, ETA {format_duration(eta)}"


def _load_ground_truth(annotations_file: Path, backend: str) -> Any:
    if not annotations_file.is_file():
        raise EvaluationError(f"{annotations_file} does not exist; pass the COCO instances JSON, e.g. instances_val2017.json")
    try:
        with quiet():
            coco_gt = _coco_api(backend)[0](str(annotations_file))
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError) as e:
        raise EvaluationError(f"{annotations_file} is not a COCO instances file ({e}); pass instances_val2017.json") from e
    # Checked before any training: an annotation COCOeval cannot score would fail every evaluation, every --resume.
    refusal = scoring_refusal(
        coco_gt.dataset, str(annotations_file),
        "fix or remove it in the file, then shard the val set again (tools/shard_coco.py --mode eval)",
    )
    if refusal:
        raise EvaluationError(refusal)
    return coco_gt


def quiet() -> contextlib.AbstractContextManager:
    """Swallow what the COCO APIs print while they load and match ('loading annotations...', 'DONE')."""
    return contextlib.redirect_stdout(io.StringIO())


def _coco_api(backend: str) -> tuple[Any, Any]:
    """(COCO, COCOeval) of a backend; faster-coco-eval is an optional extra, imported only when asked for."""
    if backend == "faster":
        from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster

        # One thread for its segm IoUs: the evaluation's processes are the parallelism (train.parallel_cocoeval).
        return FasterCOCO, functools.partial(COCOeval_faster, print_function=print, rle_iou_max_workers=1)
    return COCO, COCOeval


def _category_lookup(categories: Sequence[Mapping[str, Any]], coco_gt: Any, annotations_file: Path) -> np.ndarray:
    """Array mapping contiguous labels 1..K (0: padding) to COCO category ids."""
    lookup = np.zeros(max((int(c["id"]) for c in categories), default=0) + 1, dtype=np.int64)
    for category in categories:
        lookup[int(category["id"])] = int(category["coco_id"])
    missing = set(lookup[1:].tolist()) - set(coco_gt.getCatIds())
    if missing:
        raise EvaluationError(
            f"{annotations_file} lacks COCO categories {sorted(missing)} that the shards use; "
            f"pass the annotation file these shards were made from"
        )
    return lookup


def _load_results(coco_gt: Any, results: list[dict]) -> Any:
    if results:
        return coco_gt.loadRes(results)
    # pycocotools' loadRes fails on an empty list; no detections is a valid result scoring 0.
    coco_dt = type(coco_gt)()
    coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def gather_to_main(results: dict[int, ImageResult]) -> list[dict[int, ImageResult]] | None:
    """Every rank's results on rank 0 (None on the others); just this one's without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [results]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(results, gathered, dst=0)
    return gathered
