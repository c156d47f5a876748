"""COCO evaluation: exact against pycocotools, hand-worked AP, torchvision's paste, and rank merging."""

from __future__ import annotations

import json
import statistics
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from model.detections import Detections
from pipeline.shard_format import file_sha256, write_manifest
from tools.bench_eval import (
    make_eval_set,
    reference_encode_masks,
    reference_results,
    run_benchmark,
)
from train.evaluation import (
    STAT_NAMES,
    COCOEvaluator,
    EvaluationError,
    ImageResult,
    check_annotations_match,
    inference_on_dataset,
    per_image_futures,
)
from train.mask_encoding import encode_masks

# Hand-worked case: one 300x300 image, two large square objects of COCO category 7.
SQUARES = {"first": (0, 0, 100, 100), "second": (150, 150, 250, 250), "elsewhere": (0, 200, 100, 300)}
CATEGORIES = [{"id": 1, "coco_id": 7, "name": "square"}, {"id": 2, "coco_id": 9, "name": "never predicted"}]


def _polygon(box):
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _square_rle(name):
    rle = mask_utils.frPyObjects([_polygon(SQUARES[name])], 300, 300)[0]
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _write_squares(tmp_path: Path, with_second_class: bool = False) -> Path:
    objects = [("first", 7), ("second", 7)] + ([("elsewhere", 9)] if with_second_class else [])
    annotations = [
        {
            "id": i + 1,
            "image_id": 1,
            "category_id": category_id,
            "segmentation": [_polygon(SQUARES[name])],
            "bbox": [SQUARES[name][0], SQUARES[name][1], 100, 100],
            "area": 10000.0,
            "iscrowd": 0,
        }
        for i, (name, category_id) in enumerate(objects)
    ]
    dataset = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 300, "width": 300}],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "square"}, {"id": 9, "name": "never predicted"}],
    }
    path = tmp_path / "squares.json"
    path.write_text(json.dumps(dataset))
    return path


def _square_detections(names_and_scores) -> ImageResult:
    return ImageResult(
        boxes_xywh=np.array([[*SQUARES[n][:2], 100, 100] for n, _ in names_and_scores], np.float32),
        scores=np.array([s for _, s in names_and_scores], np.float32),
        category_ids=np.full(len(names_and_scores), 7),
        rles=[_square_rle(n) for n, _ in names_and_scores],
    )


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_hand_worked_average_precision(tmp_path, backend):
    # Ranked detections: hit (0.9), miss (0.8), hit (0.7). Precision at recall 0.5 is 1, at
    # recall 1 it is 2/3; of COCO's 101 recall points, 51 lie at or below 0.5.
    evaluator = COCOEvaluator(_write_squares(tmp_path), CATEGORIES[:1], backend=backend, num_workers=0)
    ranked = [("first", 0.9), ("elsewhere", 0.8), ("second", 0.7)]
    metrics = evaluator.score([{1: _square_detections(ranked)}])
    by_hand = (51 * 1.0 + 50 * 2 / 3) / 101
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        for name in ("AP", "AP50", "AP75", "APl"):
            assert stats[name] == pytest.approx(by_hand, abs=1e-12)
        assert stats["APs"] == stats["APm"] == -1  # no small or medium objects in the ground truth
        assert (stats["AR1"], stats["AR10"], stats["AR100"]) == (0.5, 1.0, 1.0)


def test_a_class_never_predicted_scores_zero_and_no_detections_score_zero(tmp_path):
    annotations = _write_squares(tmp_path, with_second_class=True)
    evaluator = COCOEvaluator(annotations, CATEGORIES, num_workers=0)
    perfect_first_class = _square_detections([("first", 0.9), ("second", 0.8)])
    assert evaluator.score([{1: perfect_first_class}])["bbox"]["AP"] == pytest.approx(0.5)
    empty = ImageResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [])
    for per_rank in ([{}], [{1: empty}]):
        metrics = evaluator.score(per_rank)
        assert set(metrics) == {"bbox", "segm"}
        assert all(list(m) == list(STAT_NAMES) and m["AP"] == 0.0 for m in metrics.values())


def test_ground_truth_as_detections_scores_one(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=40, dets_per_image=10, seed=3)
    evaluator = COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=0)
    coco = COCO(str(eval_set.annotations_file))
    results = {}
    for image_id in coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        rles = [coco.annToRLE(a) for a in anns]
        results[image_id] = ImageResult(
            boxes_xywh=np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4),
            scores=np.ones(len(anns), np.float32),
            category_ids=np.array([a["category_id"] for a in anns], np.int64),
            rles=[{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles],
        )
    metrics = evaluator.score([results])
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_process_maps_resized_and_flipped_boxes_back_to_the_image(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=24, dets_per_image=16, seed=5)
    evaluator = COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=0)
    gt_boxes = {}
    for ann in json.loads(eval_set.annotations_file.read_text())["annotations"]:
        if not ann["iscrowd"]:
            x, y, w, h = ann["bbox"]
            gt_boxes.setdefault(ann["image_id"], []).append(([x, y, x + w, y + h], ann["category_id"]))
    to_label = {c["coco_id"]: c["id"] for c in eval_set.categories}
    for start in range(0, len(eval_set), 8):
        batch, _ = eval_set.batch(range(start, start + 8))
        batch.flipped = torch.arange(8) % 2 == 1
        detections = Detections(
            boxes=torch.zeros(8, 16, 4), scores=torch.zeros(8, 16), labels=torch.zeros(8, 16, dtype=torch.int64),
            mask_probs=torch.zeros(8, 16, 28, 28), num_detections=torch.zeros(8, dtype=torch.int32),
        )
        for i, image_id in enumerate(batch.image_ids.tolist()):
            objects = gt_boxes.get(image_id, [])
            boxes = torch.tensor([b for b, _ in objects]).reshape(-1, 4)
            sy, sx = batch.scales[i].tolist()
            boxes = boxes * torch.tensor([sx, sy, sx, sy])
            if batch.flipped[i]:
                width = float(batch.image_sizes[i, 1])
                boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            n = len(objects)
            detections.boxes[i, :n] = boxes
            detections.scores[i, :n] = 1.0
            detections.labels[i, :n] = torch.tensor([to_label[c] for _, c in objects], dtype=torch.int64)
            detections.num_detections[i] = n
        evaluator.process(batch, detections)
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(1.0)


def test_pycocotools_and_faster_coco_eval_agree(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=200, dets_per_image=16, seed=1, num_classes=20)
    official = COCOEvaluator(eval_set.annotations_file, eval_set.categories, backend="pycocotools", num_workers=2)
    for batch, detections in eval_set.batches(32):
        official.process(batch, detections)
    results = official.results()
    assert sum(len(r.scores) for r in results.values()) > 3000
    faster = COCOEvaluator(eval_set.annotations_file, eval_set.categories, backend="faster", num_workers=0)
    expected, got = official.score([results]), faster.score([results])
    assert 0.1 < expected["bbox"]["AP"] < 0.9 and 0.1 < expected["segm"]["AP"] < 0.9
    for iou_type in ("bbox", "segm"):
        for name in STAT_NAMES:
            assert got[iou_type][name] == pytest.approx(expected[iou_type][name], abs=1e-4), (iou_type, name)


def test_encode_masks_matches_torchvision_paste_then_pycocotools_encode():
    rng = np.random.default_rng(0)
    height, width = 97, 131
    n = 64
    masks = rng.random((n, 28, 28), dtype=np.float32)
    x0, y0 = rng.uniform(-3, width, n), rng.uniform(-3, height, n)
    sizes = np.exp(rng.uniform(np.log(0.3), np.log(160), (n, 2)))
    boxes = np.stack([x0, y0, x0 + sizes[:, 0], y0 + sizes[:, 1]], axis=1)
    boxes[:4] = [[0, 0, width, height], [0, 0, 1, 1], [width - 2, height - 2, width, height], [5, 0, 9, height]]
    # Solid masks in boxes as tall as the image: a run goes on from one column into the next.
    boxes[4:8] = [[0, 0, width, height], [3, 0, 40, height], [width - 7, 0, width, height], [60, 0, 61, height]]
    masks[4:8], masks[8:10] = 1.0, 0.0
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    ours = encode_masks(masks, boxes, height, width)
    reference = reference_encode_masks(torch.from_numpy(masks), torch.from_numpy(boxes), height, width)
    assert [r["counts"] for r in ours] == [r["counts"] for r in reference]
    assert all(r["size"] == [height, width] for r in ours)


def test_evaluator_with_workers_equals_the_straightforward_path(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=16, dets_per_image=20, seed=2, flip_fraction=0.5)
    with COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=2) as evaluator:
        for batch, detections in eval_set.batches(8):
            evaluator.process(batch, detections)
        metrics = evaluator.evaluate()
        ours = evaluator.results()
    reference = reference_results(eval_set.batches(8), eval_set.categories)
    assert ours.keys() == reference.keys()
    for image_id, result in ours.items():
        assert [r["counts"] for r in result.rles] == [r["counts"] for r in reference[image_id].rles]
        np.testing.assert_array_equal(result.category_ids, reference[image_id].category_ids)
    assert evaluator.score([reference]) == metrics


def one_rank_metrics(eval_set) -> dict[str, dict[str, float]]:
    """The metrics of one process evaluating the whole set in batches of 4: what every rank split must give."""
    single = COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=0)
    for batch, detections in eval_set.batches(4):
        single.process(batch, detections)
    return single.evaluate()


def test_two_ranks_with_padded_overlapping_batches_equal_one_rank(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=22, dets_per_image=12, seed=4)
    expected = one_rank_metrics(eval_set)

    # Each rank reads its half in batches of 4; the last batch of each is padded with repeats,
    # and rank 1 also repeats one of rank 0's images.
    rank_batches = [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]], [[11, 12, 13, 14], [15, 16, 17, 18], [19, 20, 21, 3]]]
    ranks = [COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=0) for _ in range(2)]
    for evaluator, batches in zip(ranks, rank_batches):
        for indices in batches:
            evaluator.process(*eval_set.batch(indices))
    gathered = [evaluator.results() for evaluator in ranks]
    assert ranks[0].score(gathered) == expected
    assert ranks[1].score(gathered[::-1]) == expected


class _ReplayModel(torch.nn.Module):
    """Stands in for Mask R-CNN: returns prepared detections for each image, in eval mode only."""

    def __init__(self, eval_set):
        super().__init__()
        self.eval_set = eval_set
        self.layer = torch.nn.Linear(1, 1)

    def forward(self, batch):
        assert not self.training and torch.is_inference_mode_enabled()
        index = {truth.image_id: i for i, truth in enumerate(self.eval_set.images)}
        return self.eval_set.batch([index[i] for i in batch.image_ids.tolist()])[1]


def test_inference_on_dataset_feeds_the_evaluator_and_restores_the_mode(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=12, dets_per_image=10, seed=6)
    evaluator = COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=0)
    model = _ReplayModel(eval_set).train()
    loader = [batch for batch, _ in eval_set.batches(4)]
    metrics = inference_on_dataset(model, loader, evaluator, num_warmup=1)
    assert model.training
    direct = COCOEvaluator(eval_set.annotations_file, eval_set.categories, num_workers=0)
    for batch, detections in eval_set.batches(4):
        direct.process(batch, detections)
    assert metrics == direct.evaluate()


def test_mismatched_inputs_get_one_clear_sentence(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=4, dets_per_image=2)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_manifest(shards, {"categories": eval_set.categories, "annotations_sha256": "0" * 64, "shards": [], "samples": 0,
                            "max_instances": 0, "max_polygons": 0, "max_vertices": 0})
    with pytest.raises(EvaluationError, match="not the annotation file these shards were made from"):
        COCOEvaluator.for_shards(eval_set.annotations_file, shards)
    check_annotations_match(eval_set.annotations_file, {"annotations_sha256": file_sha256(eval_set.annotations_file)})

    with pytest.raises(EvaluationError, match="unknown COCO evaluation backend"):
        COCOEvaluator(eval_set.annotations_file, eval_set.categories, backend="lvis")
    with pytest.raises(EvaluationError, match="lacks COCO categories"):
        COCOEvaluator(eval_set.annotations_file, [{"id": 1, "coco_id": 999, "name": "x"}])

    other = make_eval_set(tmp_path / "other", num_images=4, dets_per_image=2, seed=9)
    evaluator = COCOEvaluator(other.annotations_file, eval_set.categories, num_workers=0)
    evaluator.process(*eval_set.batch([0, 1]))  # image ids the other file does not have
    with pytest.raises(EvaluationError, match="are not in"):
        evaluator.evaluate()


def _evaluate_as_rank(rank, annotations_file, eval_set, rank_batches, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = COCOEvaluator(annotations_file, eval_set.categories, num_workers=0)
        for indices in rank_batches[rank]:
            evaluator.process(*eval_set.batch(indices))
        (out_dir / f"rank{rank}.json").write_text(json.dumps(evaluator.evaluate()))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_gather_and_broadcast_the_metrics_of_one_rank(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=10, dets_per_image=8, seed=7)
    expected = one_rank_metrics(eval_set)
    rank_batches = [[[0, 1, 2, 3], [4, 5, 5, 5]], [[6, 7, 8, 9], [9, 9, 2, 9]]]
    torch.multiprocessing.spawn(
        _evaluate_as_rank,
        args=(eval_set.annotations_file, eval_set, rank_batches, tmp_path / "rendezvous", tmp_path),
        nprocs=2,
    )
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_bench_tool_reports_both_paths_with_equal_results(tmp_path):
    from tools.bench_eval import get_args_parser, main

    out = tmp_path / "bench.json"
    main(get_args_parser().parse_args(["--images", "6", "--dets-per-image", "10", "--json", str(out)]))
    figures = json.loads(out.read_text())
    assert {"ours_s", "reference_s", "speedup", "ap_ours", "ap_reference"} <= figures.keys()
    assert figures["speedup"] == pytest.approx(figures["reference_s"] / figures["ours_s"])
    assert set(figures["ap_ours"]) == set(figures["ap_reference"]) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):  # faster-coco-eval against pycocotools: the same up to rounding
        assert figures["ap_ours"][iou_type] == pytest.approx(figures["ap_reference"][iou_type], abs=1e-12)
    assert figures["identical_rles"] == figures["masks"] == 60


def test_an_encoding_task_of_a_batch_settles_each_images_future():
    done, failed, cancelled = Future(), Future(), Future()
    images = per_image_futures(done, 3)
    done.set_result([["a"], [], ["b", "c"]])
    assert [f.result() for f in images] == [["a"], [], ["b", "c"]]
    images = per_image_futures(failed, 2)
    failed.set_exception(RuntimeError("worker died"))
    assert all(isinstance(f.exception(), RuntimeError) for f in images)
    images = per_image_futures(cancelled, 2)
    cancelled.cancel()  # close() cancels the tasks not started
    assert all(f.cancelled() for f in images)


def test_bench_eval_interleaves_its_rounds_and_reports_the_medians(tmp_path):
    eval_set = make_eval_set(tmp_path, num_images=12, dets_per_image=5)
    figures = run_benchmark(eval_set, workers=(1, 2), repeat=2, with_reference=False)
    assert [run["workers"] for run in figures["runs"]] == [1, 2, 1, 2]  # each run in a fresh fork, interleaved
    medians = {n: statistics.median(run["seconds"] for run in figures["runs"] if run["workers"] == n) for n in (1, 2)}
    assert figures["scaling"] == medians[1] / medians[2] and figures["ours_s"] == medians[2]
    assert figures["equal_across_workers"]
