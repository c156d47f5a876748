"""tools/evaluate.py end to end on the shared synthetic val shards, with a small random model."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model import build_model
from pipeline.shard_format import read_manifest
from tools import evaluate as evaluate_tool
from tools.evaluate import get_args_parser, main
from tests.model_helpers import random_checkpoint
from train.config import load_config
from train.evaluation import STAT_NAMES

CONFIG = "configs/demo.yaml"


def _official_ap(annotations, results, iou_type, category_id=None):
    """AP of a COCO results file, computed by pycocotools alone (segm without the boxes, as detectron2 does);
    with `category_id`, of that category alone (COCOeval restricted to it)."""
    entries = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in results]
    gt = COCO(str(annotations))
    evaluator = COCOeval(gt, gt.loadRes(entries), iou_type)
    if category_id is not None:
        evaluator.params.catIds = [category_id]
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


def test_evaluate_writes_metrics_that_pycocotools_reproduces(synthetic_coco, val_shards, weights, tmp_path, capsys):
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
    # per class, printed and in the JSON: each equals COCOeval run on that category alone
    gt = COCO(str(synthetic_coco.val_json))
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    assert [row["category_id"] for row in metrics["per_class"]] == sorted(names)
    for row in metrics["per_class"]:
        assert row["name"] == names[row["category_id"]]
        for key, iou_type in (("box_AP", "bbox"), ("mask_AP", "segm")):
            official = _official_ap(synthetic_coco.val_json, results, iou_type, row["category_id"])
            assert row[key] == pytest.approx(official, abs=1e-12) if official >= 0 else row[key] is None
    printed = capsys.readouterr().out
    first = metrics["per_class"][0]
    assert re.search(rf"^  {re.escape(first['name'])} +{100 * first['box_AP']:.1f} +{100 * first['mask_AP']:.1f}$", printed, re.M)


def _one_sentence_error(capsys, *argv) -> tuple[str, str]:
    assert _run(*argv) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err, out


def test_evaluate_explains_mismatched_weights_and_annotations(synthetic_coco, val_shards, weights, tmp_path, capsys):
    common = ["--config", CONFIG, "--data", val_shards, "--device", "cpu", "data.backend=torch"]
    err, _ = _one_sentence_error(capsys, *common, "--weights", weights, "--annotations", synthetic_coco.train_json)
    assert "not the annotation file these shards were made from" in err

    other_width = f"model.fpn_channels={2 * load_config(CONFIG).model.fpn_channels}"
    err, _ = _one_sentence_error(capsys, *common, "--weights", weights, "--annotations", synthetic_coco.val_json, other_width)
    assert re.search(r"static_part\.backbone\.fpn\.\S+ is \(32, .*\) in the file but \(64, .*\) in the model; "
                     r"set model\.fpn_channels to what the weights were trained with", err), err

    not_weights = tmp_path / "notes.pt"
    shutil.copy(synthetic_coco.val_json, not_weights)
    err, _ = _one_sentence_error(capsys, *common, "--weights", not_weights, "--annotations", synthetic_coco.val_json)
    assert "is not a loadable torch weights file" in err


@pytest.fixture(scope="module")
def checkpoint(val_shards, tmp_path_factory):
    """A trainer checkpoint (train/checkpoint.py) of a random demo-config model: it carries its config and categories."""
    return random_checkpoint(tmp_path_factory.mktemp("run"), load_config(CONFIG), read_manifest(val_shards)["categories"])


def test_evaluate_reads_the_model_config_from_the_checkpoint(synthetic_coco, val_shards, checkpoint, tmp_path, capsys):
    metrics_file = tmp_path / "metrics.json"
    common = ["--weights", checkpoint, "--data", val_shards, "--annotations", synthetic_coco.val_json, "--device", "cpu"]
    # No --config: the demo model of the checkpoint, not the reference one; overrides still apply.
    assert _run(*common, "--json", metrics_file, "data.backend=torch", "eval.ims_per_batch=4") == 0
    assert list(json.loads(metrics_file.read_text())["bbox"]) == list(STAT_NAMES)
    # --config on top: the reference model does not fit; the sentence names the layer and the key.
    err, _ = _one_sentence_error(capsys, *common, "--config", "configs/reference.yaml", "data.backend=torch")
    assert re.search(r"ckpt-00000007.pt lacks static_part\.backbone\.body\.\S+ and \d+ more; set model\.backbone\.", err), err


def test_evaluate_checks_its_output_paths_before_evaluating(synthetic_coco, val_shards, weights, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    common = ["--config", CONFIG, "--weights", weights, "--data", val_shards, "--annotations", synthetic_coco.val_json,
              "--device", "cpu", "data.backend=torch"]
    for flag in ("--json", "--results"):
        err, out = _one_sentence_error(capsys, *common, flag, a_file / "eval.json")
        assert f"{flag} {a_file / 'eval.json'} cannot be written" in err
        assert "inference:" not in out  # stopped before the evaluation
    err, _ = _one_sentence_error(capsys, *common, "--json", tmp_path)
    assert "is a folder; pass a file path" in err


def test_a_write_that_fails_at_the_end_comes_after_the_printed_metrics(
    synthetic_coco, val_shards, weights, tmp_path, capsys, monkeypatch
):
    # The folder became unwritable during the evaluation: stand in for that by skipping the early check.
    monkeypatch.setattr(evaluate_tool, "check_writable", lambda path, flag: None)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    err, out = _one_sentence_error(
        capsys, "--config", CONFIG, "--weights", weights, "--data", val_shards, "--annotations", synthetic_coco.val_json,
        "--device", "cpu", "--json", a_file / "eval.json", "data.backend=torch",
    )
    assert "could not be written" in err and "the metrics were printed above" in err
    assert re.search(r"box AP \d\.\d{4}, mask AP \d\.\d{4}", out) and "COCO segm (pycocotools" in out
