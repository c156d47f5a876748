"""Hostile inputs and interruptions on the real command lines, one test per case (docs/RELIABILITY.md
lists them with the tests that prove the other areas).

Each ends in the outcome the document names: one sentence saying what is wrong and what to do,
with no traceback, and whatever was finished kept; or a run that handles the input and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_image

from pipeline.shard_format import read_manifest
from tests.model_helpers import random_checkpoint
from tests.train_runs import ENV, command
from train.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
ALL_DETECTIONS = ["model.roi_heads.score_thresh=0.0", "model.roi_heads.detections_per_img=10"]
UNBUFFERED = {**ENV, "PYTHONUNBUFFERED": "1"}  # progress lines arrive as printed, to time a signal by them


def _tool(name: str, *argv) -> list[str]:
    return [sys.executable, str(REPO / "tools" / name), *map(str, argv)]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _one_sentence(result: subprocess.CompletedProcess, code: int, *parts: str) -> str:
    """The exit code, no traceback anywhere, and stderr's last line holding every part."""
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for part in parts:
        assert part in last, (part, last)
    return last


@pytest.fixture(scope="module")
def checkpoint(val_shards, tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("run"), load_config(CONFIG), read_manifest(val_shards)["categories"])


@pytest.fixture(scope="module")
def odd_images(synthetic_coco, tmp_path_factory):
    """One val image in the forms photos come in: a 16-bit grayscale PNG and its 8-bit twin,
    grayscale and CMYK JPEGs, RGBA, palette and grayscale+alpha PNGs, one pixel, and 4000x3000."""
    folder = tmp_path_factory.mktemp("odd_images")
    source = Image.open(sorted(synthetic_coco.val_images.glob("*.jpg"))[0])
    gray = np.array(source.convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "000000000001.png")  # v * 257 >> 8 == v
    Image.fromarray(gray).save(folder / "000000000002.png")
    source.convert("L").save(folder / "000000000003.jpg")
    source.convert("CMYK").save(folder / "000000000004.jpg")
    source.convert("RGBA").save(folder / "000000000005.png")
    source.convert("P").save(folder / "000000000006.png")
    source.convert("LA").save(folder / "000000000007.png")
    Image.new("RGB", (1, 1), (90, 140, 20)).save(folder / "000000000008.png")
    source.convert("RGB").resize((4000, 3000)).save(folder / "000000000009.jpg")
    return folder


@pytest.fixture(scope="module")
def odd_predictions(odd_images, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("odd_predicted")
    result = _run(_tool("predict.py", "--weights", checkpoint, "--images", odd_images, "--out", out, "--device", "cpu",
                        "--score-threshold", "0", "--batch-size", "1", *ALL_DETECTIONS))
    return result, out


def test_predict_reads_a_16_bit_png_as_its_8_bit_twin(odd_images, odd_predictions):
    assert decode_image(str(odd_images / "000000000001.png")).dtype == torch.uint16  # the case is real
    result, out = odd_predictions
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    by_image = {}
    for entry in json.loads((out / "detections.json").read_text()):
        by_image.setdefault(entry["image_id"], []).append(entry)
    sixteen, eight = by_image[1], by_image[2]
    assert len(sixteen) == len(eight) == 10
    for a, b in zip(sixteen, eight):
        assert a["category_id"] == b["category_id"] and a["segmentation"] == b["segmentation"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)
    assert (out / "pictures" / "000000000001.png").is_file()


def test_predict_takes_every_kind_of_photo(odd_predictions):
    result, out = odd_predictions
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "warning" not in result.stdout and "wrote 90 detections of 9 images" in result.stdout
    ids = {e["image_id"] for e in json.loads((out / "detections.json").read_text())}
    assert ids == set(range(1, 10))
    for entry in json.loads((out / "detections.json").read_text()):
        if entry["image_id"] == 9:
            assert entry["segmentation"]["size"] == [3000, 4000]  # masks in the big image's own pixels


@pytest.fixture(scope="module")
def many_photos(synthetic_coco, tmp_path_factory):
    """60 photos: more than a predict run finishes before the test's signal arrives."""
    folder = tmp_path_factory.mktemp("many_photos")
    sources = sorted(synthetic_coco.val_images.glob("*.jpg"))
    for i in range(60):
        shutil.copy(sources[i % len(sources)], folder / f"{i + 1:012d}.jpg")
    return folder


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_predict_stopped_by_a_signal_keeps_the_finished_images(signum, many_photos, checkpoint, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        _tool("predict.py", "--weights", checkpoint, "--images", many_photos, "--out", out, "--device", "cpu",
              "--score-threshold", "0", "--batch-size", "1", "--no-pictures", *ALL_DETECTIONS),
        cwd=REPO, env=UNBUFFERED, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in process.stdout:
        if line.startswith("predict: 1/"):  # the first image is done
            process.send_signal(signum)
            break
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    last = _one_sentence(result, 128 + signum, f"stopped by {signal.Signals(signum).name}; the ",
                         f"are in {out / 'detections.json'}: run the same command again with --overwrite for every image")
    finished = int(re.search(r"detections of the (\d+) images finished", last).group(1))
    entries = json.loads((out / "detections.json").read_text())
    assert 1 <= finished < 60 and len({e["image_id"] for e in entries}) == finished and len(entries) == 10 * finished


def _wait_until(condition, what: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def _catches_sigterm(pid: int) -> bool:
    """Linux's SigCgt mask: the tool is past its imports and inside its work, under its handler."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16) >> (signal.SIGTERM - 1) & 1)


def _has_children(pid: int) -> bool:
    """The mask-encoding workers exist: they start with the first batch's detections, so inference runs."""
    return any((task / "children").read_text().split() for task in Path(f"/proc/{pid}/task").iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum, moment", [(signal.SIGTERM, "reading the weights"), (signal.SIGINT, "during inference")])
def test_evaluate_stopped_by_a_signal_is_one_sentence(signum, moment, checkpoint, val_shards, synthetic_coco, tmp_path):
    metrics = tmp_path / "eval.json"
    process = subprocess.Popen(
        _tool("evaluate.py", "--weights", checkpoint, "--data", val_shards, "--annotations", synthetic_coco.val_json,
              "--device", "cpu", "--json", metrics, "data.backend=torch", "eval.ims_per_batch=1", "eval.num_workers=2"),
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_until(lambda: _catches_sigterm(process.pid), "evaluate installs its signal handler")
    if moment == "during inference":
        _wait_until(lambda: _has_children(process.pid), "evaluate starts its encoding workers")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    _one_sentence(result, 128 + signum, f"stopped by {signal.Signals(signum).name}; nothing was written: run the same command again")
    assert not metrics.exists() and "Average Precision" not in stdout  # stopped before the scores


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "(its zip archive ends early: the file is truncated)"),
        ("text", "(Unsupported operand"),
        ("foreign class", "(unpickling it would call argparse.Namespace, so it could run code on this machine; it was not loaded)"),
    ],
)
def test_a_damaged_weights_file_is_one_sentence_without_unsafe_advice(case, message, checkpoint, synthetic_coco, tmp_path):
    weights = tmp_path / "weights.pt"
    if case == "truncated":
        weights.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif case == "text":
        weights.write_text("not weights")
    else:
        torch.save({"model": argparse.Namespace(layers=1)}, weights)  # a pickle of objects, not of tensors
    result = _run(_tool("predict.py", "--weights", weights, "--images", synthetic_coco.val_images, "--out", tmp_path / "out"))
    last = _one_sentence(result, 2, f"error: {weights} is not a loadable torch weights file {message}",
                         "pass a state dict saved with torch.save")
    assert "weights_only" not in last
    assert not (tmp_path / "out").exists()


def test_train_with_truncated_initial_weights_stops_before_writing(train_shards, val_shards, synthetic_coco, checkpoint, tmp_path):
    weights = tmp_path / "init.pt"
    weights.write_bytes(checkpoint.read_bytes()[:100_000])
    out = tmp_path / "run"
    result = subprocess.run(command(train_shards, val_shards, synthetic_coco, out, f"train.weights={weights}"),
                            env=ENV, capture_output=True, text=True, timeout=600)
    _one_sentence(result, 2, f"error: {weights} is not a loadable torch weights file", "the file is truncated")
    assert not out.exists()


def test_training_on_eval_shards_is_one_sentence(val_shards, synthetic_coco, tmp_path):
    """Eval shards keep images without objects and leave crowd regions out: not a training set."""
    out = tmp_path / "run"
    result = subprocess.run(command(val_shards, val_shards, synthetic_coco, out), env=ENV, capture_output=True, text=True, timeout=600)
    _one_sentence(result, 2, "holds shards made with --mode eval", "tools/shard_coco.py --mode train")
    assert not out.exists()


def test_validating_on_training_shards_says_which_images_count_as_missed(train_shards, synthetic_coco, tmp_path):
    """--mode train leaves out images without objects: the evaluation scores every annotated
    image, counts the left-out ones as images without detections and says so."""
    out = tmp_path / "run"
    argv = [*command(train_shards, train_shards, synthetic_coco, out), "--val-annotations", str(synthetic_coco.train_json),
            "solver.max_iter=2", "solver.steps=[1, 2]", "solver.warmup_iters=1"]
    result = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    kept = read_manifest(train_shards)["samples"]
    left_out = len(synthetic_coco.train_ids) - kept
    assert left_out > 0
    assert (f"evaluating {kept} of the {len(synthetic_coco.train_ids)} images in {synthetic_coco.train_json}; "
            f"the other {left_out} count as images without detections") in result.stdout + result.stderr
    assert json.loads((out / "summary.json").read_text())


@pytest.fixture
def val_copy(synthetic_coco, tmp_path):
    folder = tmp_path / "val2017"
    shutil.copytree(synthetic_coco.val_images, folder)
    return folder


def test_visualize_names_an_image_that_does_not_decode(synthetic_coco, val_copy, tmp_path):
    names = [i["file_name"] for i in sorted(json.loads(synthetic_coco.val_json.read_text())["images"], key=lambda i: i["id"])]
    (val_copy / names[2]).write_bytes(b"\xff\xd8 cut short")
    out = tmp_path / "pictures"
    result = _run(_tool("visualize.py", "--annotations", synthetic_coco.val_json, "--images", val_copy, "--out", out, "--num", "4"))
    _one_sentence(result, 2, f"error: {val_copy / names[2]} does not decode as a JPEG or PNG",
                  "replace it with the data set's original file")
    assert len(list(out.glob("*.png"))) == 2  # the pictures drawn before it stay


@pytest.mark.parametrize("case, reason", [("not JSON", "(Expecting"), ("a results list", "(annotation file format")])
def test_visualize_names_annotations_that_are_not_coco_instances(case, reason, synthetic_coco, tmp_path):
    annotations = tmp_path / "annotations.json"
    annotations.write_text("{" if case == "not JSON" else json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]))
    result = _run(_tool("visualize.py", "--annotations", annotations, "--images", synthetic_coco.val_images, "--out", tmp_path / "out"))
    _one_sentence(result, 2, f"error: {annotations} is not a COCO instances JSON {reason}",
                  "pass the annotations, e.g. instances_val2017.json, and detections with --predictions")


def test_make_synthetic_coco_into_a_file_is_one_sentence(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = _run(_tool("make_synthetic_coco.py", "--out", tmp_path / "a-file", "--split", "val", "--num-images", "2"))
    _one_sentence(result, 1, f"make_synthetic_coco: cannot write {tmp_path / 'a-file' / 'val2017'} (Not a directory)",
                  "pass an --out folder you can write to")
    assert os.path.getsize(tmp_path / "a-file") == 0


def test_time_to_train_on_a_log_of_an_unfinished_attempt_is_one_sentence(tmp_path):
    log = tmp_path / "mlperf.log"
    log.write_text("not an MLPerf log\n")
    result = _run(_tool("time_to_train.py", log))
    _one_sentence(result, 2, f"error: {log} has no run_start and no run_stop: the attempt did not finish")


def test_sharding_with_zero_samples_per_shard_is_one_sentence(synthetic_coco, tmp_path):
    result = _run(_tool("shard_coco.py", "--images", synthetic_coco.val_images, "--annotations", synthetic_coco.val_json,
                        "--out", tmp_path / "shards", "--mode", "eval", "--samples-per-shard", "0"))
    _one_sentence(result, 2, "shard_coco: --samples-per-shard and --workers must be at least 1")
    assert not (tmp_path / "shards").exists()
