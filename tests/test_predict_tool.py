"""tools/predict.py on a folder of synthetic photos: JPEGs and a PNG of different sizes and
orientations, and a JPEG stored sideways with an EXIF orientation tag.

Its detections must equal those of the same images evaluated through the shard path
(tools/evaluate.py --results on the val shards), the EXIF photo's must be those of its upright
pixels (as PIL's `ImageOps.exif_transpose` shows it), and pycocotools must read the JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import ImageReadMode, decode_image

from model.build import build_model_with_weights
from model.weights import read_weights
from pipeline.images import batch_from_images
from pipeline.loader import settings_from_config
from pipeline.shard_format import read_manifest
from tests.model_helpers import random_checkpoint
from tools.evaluate import get_args_parser as evaluate_parser
from tools.evaluate import main as evaluate_main
from tools.predict import get_args_parser, main
from train.config import load_config
from train.inference import Detector, config_for_weights, detect, image_id, predict, result_entries

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
# A random model scores everything low: keep all it finds, the best 10 per image (fast to draw and encode).
ALL_DETECTIONS = ["model.roi_heads.score_thresh=0.0", "model.roi_heads.detections_per_img=10"]


@pytest.fixture(scope="module")
def checkpoint(val_shards, tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("run"), load_config(CONFIG), read_manifest(val_shards)["categories"])


@pytest.fixture(scope="module")
def photos(synthetic_coco, tmp_path_factory):
    """A folder of photos named by val image id (of different sizes): two JPEGs as they are (one
    portrait), one re-saved losslessly as PNG, one stored rotated with EXIF orientation 6 ("turn
    90 degrees clockwise"); besides them a text file and a JPEG that does not decode."""
    folder = tmp_path_factory.mktemp("photos")
    coco = COCO(str(synthetic_coco.val_json))
    infos = coco.loadImgs(sorted(coco.getImgIds()))
    portrait = next(i for i in infos if i["height"] > i["width"])
    landscape = [i for i in infos if i["height"] <= i["width"]][:3]
    chosen = {"jpeg": landscape[0], "portrait": portrait, "png": landscape[1], "exif": landscape[2]}
    sources = {kind: synthetic_coco.val_images / info["file_name"] for kind, info in chosen.items()}
    shutil.copy(sources["jpeg"], folder)
    shutil.copy(sources["portrait"], folder)
    Image.open(sources["png"]).convert("RGB").save(folder / (sources["png"].stem + ".png"))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = Image.open(sources["exif"]).transpose(Image.Transpose.ROTATE_90)
    sideways.save(folder / sources["exif"].name, exif=exif, quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "000000000001.jpg").write_bytes(b"\xff\xd8 truncated")  # does not decode: skipped with a warning
    return folder, {kind: info["id"] for kind, info in chosen.items()}


def _predict(*argv) -> int:
    return main(get_args_parser().parse_intermixed_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def predicted(photos, checkpoint, tmp_path_factory):
    folder, _ = photos
    out = tmp_path_factory.mktemp("predicted")
    assert _predict("--weights", checkpoint, "--images", folder, "--out", out, "--score-threshold", "0",
                    "--batch-size", "1", "--device", "cpu", *ALL_DETECTIONS) == 0
    return out, json.loads((out / "detections.json").read_text())


def _by_image(entries):
    grouped = {}
    for e in entries:
        grouped.setdefault(e["image_id"], []).append(e)
    return grouped


def _assert_same_detections(ours, theirs):
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a["category_id"] == b["category_id"] and a["segmentation"] == b["segmentation"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)


def test_predictions_equal_the_shard_paths_detections(photos, predicted, checkpoint, synthetic_coco, val_shards, tmp_path):
    _, ids = photos
    _, entries = predicted
    results = tmp_path / "results.json"
    code = evaluate_main(evaluate_parser().parse_intermixed_args([
        "--weights", str(checkpoint), "--data", str(val_shards), "--annotations", str(synthetic_coco.val_json),
        "--device", "cpu", "--results", str(results), "data.backend=torch", "eval.ims_per_batch=1", *ALL_DETECTIONS,
    ]))
    assert code == 0
    ours, theirs = _by_image(entries), _by_image(json.loads(results.read_text()))
    for kind in ("jpeg", "portrait", "png"):  # the PNG holds the JPEG's decoded pixels, losslessly
        _assert_same_detections(ours[ids[kind]], theirs[ids[kind]])


def test_an_exif_rotated_photo_is_detected_upright(photos, predicted, checkpoint, synthetic_coco):
    folder, ids = photos
    _, entries = predicted
    path = folder / f"{ids['exif']:012d}.jpg"
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    pixels = torch.from_numpy(np.array(upright)).permute(2, 0, 1).contiguous()
    info = COCO(str(synthetic_coco.val_json)).loadImgs(ids["exif"])[0]
    assert tuple(pixels.shape[1:]) == (info["height"], info["width"])  # upright again
    weights = read_weights(checkpoint)
    cfg = config_for_weights(weights, None, ALL_DETECTIONS)
    categories = weights.class_categories()
    model = build_model_with_weights(cfg.model, categories, weights, torch.device("cpu"))
    batch = batch_from_images([pixels], settings_from_config(cfg.data, training=False), torch.device("cpu"))
    expected = result_entries(detect(model, batch, categories)[0], ids["exif"], path.name)
    _assert_same_detections(_by_image(entries)[ids["exif"]], expected)
    for entry in _by_image(entries)[ids["exif"]]:
        assert entry["segmentation"]["size"] == [info["height"], info["width"]]


def test_the_json_is_coco_results_with_names_and_pictures_are_written(photos, predicted, synthetic_coco, val_shards):
    folder, ids = photos
    out, entries = predicted
    names = {c["coco_id"]: c["name"] for c in read_manifest(val_shards)["categories"]}
    for entry in entries:
        assert entry["category_name"] == names[entry["category_id"]]
        assert entry["file_name"] == next(p.name for p in folder.iterdir() if p.stem == f"{entry['image_id']:012d}")
    gt = COCO(str(synthetic_coco.val_json))
    loaded = gt.loadRes(entries)  # pycocotools accepts it as a results file (box AP reads it like this)
    assert len(loaded.getAnnIds()) == len(entries)
    masks_only = gt.loadRes([{k: v for k, v in e.items() if k != "bbox"} for e in entries])  # as mask AP reads it
    for ann, entry in zip(masks_only.loadAnns(masks_only.getAnnIds()), entries):
        mask = masks_only.annToMask(ann)
        assert ann["area"] == mask.sum()
        if mask.any():  # the mask lies in its box (pasted into it, one pixel of rounding either way)
            ys, xs = np.nonzero(mask)
            x, y, w, h = entry["bbox"]
            assert x - 2 <= xs.min() and xs.max() <= x + w + 2 and y - 2 <= ys.min() and ys.max() <= y + h + 2
    pictures = sorted(p.stem for p in (out / "pictures").glob("*.png"))
    assert pictures == sorted(f"{i:012d}" for i in ids.values())
    picture = decode_image(str(out / "pictures" / f"{ids['portrait']:012d}.png"), mode=ImageReadMode.RGB)
    assert picture.shape[2] >= 640 and picture.shape[1] > picture.shape[2]  # upscaled, still portrait


def test_the_threshold_and_the_command_line(photos, checkpoint, tmp_path):
    folder, _ = photos
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "predict.py"), "--weights", str(checkpoint), "--images", str(folder),
         "--out", str(out), "--score-threshold", "0.2", "--device", "cpu", "--no-pictures", *ALL_DETECTIONS],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    entries = json.loads((out / "detections.json").read_text())
    assert all(e["score"] >= 0.2 for e in entries)
    (warning,) = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warning == (f"warning: skipped {folder / '000000000001.jpg'} does not decode as a JPEG or PNG image "
                       "(unsupported image file); check or remove the file")
    assert not list((out / "pictures").glob("*.png"))


@pytest.mark.parametrize("case", ["no folder", "no images", "backbone only", "unwritable out"])
def test_bad_inputs_are_one_sentence(case, photos, checkpoint, tmp_path, capsys):
    folder, _ = photos
    weights, images, out = checkpoint, folder, tmp_path / "out"
    if case == "no folder":
        images = tmp_path / "missing"
    elif case == "no images":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "backbone only":
        import torchvision

        weights = tmp_path / "resnet.pth"
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    elif case == "unwritable out":
        (tmp_path / "a-file").write_text("")
        out = tmp_path / "a-file" / "out"
    assert _predict("--weights", weights, "--images", images, "--out", out, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    expected = {"no folder": "is not a folder", "no images": "holds no .jpg", "backbone only": "holds a backbone only",
                "unwritable out": "cannot be written"}[case]
    assert expected in err
    assert not out.exists()  # nothing written


def test_a_name_that_is_no_number_gets_its_own_id_and_leaves_the_others_theirs(photos, predicted, checkpoint, tmp_path):
    folder, ids = photos
    _, entries = predicted
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copy(mixed / f"{ids['jpeg']:012d}.jpg", mixed / "holiday photo.jpg")
    out = tmp_path / "out"
    assert _predict("--weights", checkpoint, "--images", mixed, "--out", out, "--score-threshold", "0", "--batch-size", "1",
                    "--device", "cpu", "--no-pictures", *ALL_DETECTIONS) == 0
    found = _by_image(json.loads((out / "detections.json").read_text()))
    before = _by_image(entries)
    for number, kept in before.items():  # the numbered files keep their ids (and detections)
        _assert_same_detections(found[number], kept)
    (extra,) = set(found) - set(before)
    assert extra == image_id("holiday photo.jpg") < 2**52 and {e["file_name"] for e in found[extra]} == {"holiday photo.jpg"}
    _assert_same_detections(found[extra], before[ids["jpeg"]])  # the same pixels


def test_two_files_with_one_id_are_one_sentence_before_anything_is_written(photos, checkpoint, tmp_path, capsys):
    folder, ids = photos
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(folder / f"{ids['jpeg']:012d}.jpg", clash / "7.jpg")
    shutil.copy(folder / f"{ids['jpeg']:012d}.jpg", clash / "007.jpg")
    out = tmp_path / "out"
    assert _predict("--weights", checkpoint, "--images", clash, "--out", out, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: 007.jpg and 7.jpg both get image_id 7 (from their names); rename one of them"
    assert not out.exists()


def test_the_python_api_takes_paths_pil_images_and_arrays_and_equals_the_tool(photos, predicted, checkpoint):
    folder, ids = photos
    _, entries = predicted
    path = folder / f"{ids['portrait']:012d}.jpg"
    pil = Image.open(path)
    array = np.array(pil.convert("RGB"))
    results = predict(checkpoint, [path, pil, array], score_threshold=0.0, overrides=ALL_DETECTIONS, device="cpu")
    expected = _by_image(entries)[ids["portrait"]]
    for found in results:  # each kind of input: the tool's detections, with names and masks
        assert len(found) == len(expected) > 0
        _assert_same_detections(result_entries(found, ids["portrait"], path.name), expected)
        assert found.names == [e["category_name"] for e in expected]
        masks = found.masks
        assert masks.shape == (len(found), *array.shape[:2]) and masks.dtype == bool
        assert np.array_equal(masks[0], mask_utils.decode(expected[0]["segmentation"]).astype(bool))
    detector = Detector(checkpoint, score_threshold=0.2, overrides=ALL_DETECTIONS, device="cpu")
    (kept,) = detector(str(path))
    assert len(kept) == sum(e["score"] >= 0.2 for e in expected) and (kept.scores >= 0.2).all()
    with pytest.raises(ValueError, match=r"image 0 is an array of float64 \(4, 4\); pass uint8"):
        detector([np.zeros((4, 4))])
