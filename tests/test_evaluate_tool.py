"""tools/evaluate.py end to end on the shared synthetic val shards, with a small random model."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model import build_model
from pipeline.shard_format import read_manifest
from tools.evaluate import get_args_parser, main
from train.config import load_config
from train.evaluation import STAT_NAMES

CONFIG = "configs/demo.yaml"


def _official_ap(annotations, results, iou_type):
    """AP of a COCO results file, computed by pycocotools alone (segm without the boxes, as detectron2 does)."""
    entries = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in results]
    gt = COCO(str(annotations))
    evaluator = COCOeval(gt, gt.loadRes(entries), iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[0]


@pytest.fixture(scope="module")
def weights(val_shards, tmp_path_factory):
    torch.manual_seed(0)
    num_classes = len(read_manifest(val_shards)["categories"]) + 1
    model = build_model(load_config(CONFIG).model, num_classes=num_classes)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def _run(*argv):
    return main(get_args_parser().parse_intermixed_args([str(a) for a in argv]))


def test_evaluate_writes_metrics_that_pycocotools_reproduces(synthetic_coco, val_shards, weights, tmp_path):
    metrics_file, results_file = tmp_path / "metrics.json", tmp_path / "results.json"
    code = _run(
        "--config", CONFIG, "--weights", weights, "--data", val_shards, "--annotations", synthetic_coco.val_json,
        "--device", "cpu", "--json", metrics_file, "--results", results_file,
        "data.backend=torch", "eval.ims_per_batch=4", "model.roi_heads.score_thresh=0.0",
    )
    assert code == 0
    metrics = json.loads(metrics_file.read_text())
    results = json.loads(results_file.read_text())
    assert results, "a random model with no score threshold still detects something"
    for iou_type in ("bbox", "segm"):
        assert list(metrics[iou_type]) == list(STAT_NAMES)
        assert metrics[iou_type]["AP"] == pytest.approx(_official_ap(synthetic_coco.val_json, results, iou_type), abs=1e-12)


def test_evaluate_explains_mismatched_weights_and_annotations(synthetic_coco, val_shards, weights, tmp_path, capsys):
    common = ["--config", CONFIG, "--data", val_shards, "--device", "cpu", "data.backend=torch"]
    assert _run(*common, "--weights", weights, "--annotations", synthetic_coco.train_json) == 1
    assert "not the annotation file these shards were made from" in capsys.readouterr().err

    other_width = f"model.fpn_channels={2 * load_config(CONFIG).model.fpn_channels}"
    assert _run(*common, "--weights", weights, "--annotations", synthetic_coco.val_json, other_width) == 1
    assert "does not fit the model built from the config" in capsys.readouterr().err

    not_weights = tmp_path / "notes.pt"
    shutil.copy(synthetic_coco.val_json, not_weights)
    assert _run(*common, "--weights", not_weights, "--annotations", synthetic_coco.val_json) == 1
    assert "does not fit the model" in capsys.readouterr().err
