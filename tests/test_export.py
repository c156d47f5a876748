"""tools/export.py through its command line, and the ONNX file it writes run by onnxruntime on the val photos.

The exported graph's detections, mapped to each photo's pixels by the same code as PyTorch's
(`train.inference.in_image_pixels`), must equal PyTorch's within train.export.TOLERANCE: the
same labels and counts, boxes within 0.01 px of the network input (scaled to the photo),
scores within 1e-5, and the pasted masks nearly the same pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.images import batch_from_images
from pipeline.shard_format import read_manifest
from tests.model_helpers import random_checkpoint
from tools.export import get_args_parser, main
from train.config import load_config
from train.export import TOLERANCE, onnx_session, run_onnx
from train.inference import Detector, in_image_pixels, read_image

pytest.importorskip("onnxruntime")
CONFIG = "configs/demo.yaml"
SHAPE = (128, 160)  # the demo's landscape bucket: the val photos (160x200) resize into it
# A random model scores everything low: keep all it finds, the best 10 per image.
ALL_DETECTIONS = ["model.roi_heads.score_thresh=0.0", "model.roi_heads.detections_per_img=10"]


@pytest.fixture(scope="module")
def exported(val_shards, tmp_path_factory):
    checkpoint = random_checkpoint(tmp_path_factory.mktemp("run"), load_config(CONFIG), read_manifest(val_shards)["categories"])
    out = tmp_path_factory.mktemp("export")
    argv = ["--weights", str(checkpoint), "--out", str(out), "--shape", *map(str, SHAPE), *ALL_DETECTIONS]
    assert main(get_args_parser().parse_intermixed_args(argv)) == 0
    return checkpoint, out


def test_export_writes_the_file_and_its_description(exported, val_shards, capsys):
    _, out = exported
    description = json.loads((out / "export.json").read_text())
    (entry,) = description["files"]
    assert entry["file"] == "model-128x160.onnx" and entry["input_shape"] == [1, 3, *SHAPE]
    assert (out / entry["file"]).stat().st_size > 0
    assert description["categories"] == read_manifest(val_shards)["categories"]
    assert description["resize"]["min_size"] == load_config(CONFIG).data.min_size
    assert description["convention"] == load_config(CONFIG).model.convention  # how to read the boxes
    assert all(entry["largest_differences"][name] <= limit for name, limit in TOLERANCE.items())


def test_the_onnx_file_detects_what_pytorch_detects_on_the_val_photos(exported, synthetic_coco):
    checkpoint, out = exported
    detector = Detector(checkpoint, overrides=ALL_DETECTIONS, device="cpu", score_threshold=0.0)
    session = onnx_session(out / "model-128x160.onnx")
    coco = COCO(str(synthetic_coco.val_json))
    compared = 0
    for info in coco.loadImgs(sorted(coco.getImgIds())):
        image = read_image(synthetic_coco.val_images / info["file_name"])
        batch = batch_from_images([image], detector.settings, torch.device("cpu"))
        if tuple(batch.images.shape[2:]) != SHAPE:
            continue  # a portrait photo: the other bucket's file
        with torch.no_grad():
            ours = in_image_pixels(batch, detector.model(batch), detector.categories)[0]
        inclusive = detector.config.model.convention == "reference"
        theirs = in_image_pixels(batch, run_onnx(session, batch, inclusive), detector.categories)[0]
        assert len(theirs) == len(ours) > 0
        assert theirs.names == ours.names and np.array_equal(theirs.labels, ours.labels)
        scale = float(batch.scales.min())
        np.testing.assert_allclose(theirs.boxes, ours.boxes, atol=TOLERANCE["boxes"] / scale, rtol=0)
        np.testing.assert_allclose(theirs.scores, ours.scores, atol=TOLERANCE["scores"], rtol=0)
        for a, b in zip(theirs.rles, ours.rles):  # thresholded at 0.5: a pixel at the edge may flip
            union = mask_utils.area(mask_utils.merge([a, b], intersect=False))
            assert union == 0 or mask_utils.area(mask_utils.merge([a, b], intersect=True)) / union > 0.98
        compared += 1
    assert compared >= 6
