"""tools/visualize.py and train/visualization.py on the shared synthetic val set."""

from __future__ import annotations

import json

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.io import ImageReadMode, decode_image

from tools.visualize import get_args_parser, main
from train.visualization import GAP


def _as_results(coco, anns, score):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score,
         "segmentation": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in coco.annToRLE(a).items()}}
        for a in anns
    ]


def test_pictures_show_ground_truth_and_predictions_side_by_side(synthetic_coco, tmp_path):
    coco = COCO(str(synthetic_coco.val_json))
    image_id = next(i for i in sorted(coco.getImgIds())[:3] if _has_objects_and_no_crowd(coco, i))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    predictions = tmp_path / "results.json"
    predictions.write_text(json.dumps(_as_results(coco, anns, 0.9)))
    args = ["--annotations", synthetic_coco.val_json, "--images", synthetic_coco.val_images,
            "--predictions", predictions, "--out", tmp_path / "out", "--num", "3"]
    assert main(get_args_parser().parse_args([str(a) for a in args])) == 0

    pictures = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in pictures] == [f"{i:012d}.png" for i in sorted(coco.getImgIds())[:3]]
    info = coco.loadImgs(image_id)[0]
    original = decode_image(str(synthetic_coco.val_images / info["file_name"]), mode=ImageReadMode.RGB)
    picture = decode_image(str(tmp_path / "out" / f"{image_id:012d}.png"))
    width = info["width"]
    assert picture.shape == (3, info["height"], 2 * width + GAP)
    left, right = picture[:, :, :width], picture[:, :, width + GAP :]
    inside = torch.from_numpy(coco.annToMask(anns[0]).astype(bool))
    for half in (left, right):  # same objects drawn on both sides: masks tinted, the background kept
        assert (half != original).any(dim=0)[inside].float().mean() > 0.9
    # Rows that no box (nor its label, written inside the box's top) reaches keep the image's pixels.
    drawn_rows = np.zeros(info["height"], dtype=bool)
    for a in anns:
        drawn_rows[max(int(a["bbox"][1]) - 2, 0) : int(a["bbox"][1] + a["bbox"][3]) + 14] = True
    assert (~drawn_rows).any()
    assert torch.equal(left[:, ~drawn_rows], original[:, ~drawn_rows])


def _has_objects_and_no_crowd(coco, image_id):
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    return bool(anns) and not any(a["iscrowd"] for a in anns)


def test_predictions_below_the_threshold_are_left_out(synthetic_coco, tmp_path):
    coco = COCO(str(synthetic_coco.val_json))
    image_id = next(i for i in sorted(coco.getImgIds()) if coco.getAnnIds(imgIds=i, iscrowd=False))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
    predictions = tmp_path / "results.json"
    predictions.write_text(json.dumps(_as_results(coco, anns, 0.1)))
    args = ["--annotations", synthetic_coco.val_json, "--images", synthetic_coco.val_images, "--predictions",
            predictions, "--out", tmp_path / "out", "--num", "12", "--no-ground-truth"]
    assert main(get_args_parser().parse_args([str(a) for a in args])) == 0
    info = coco.loadImgs(image_id)[0]
    original = decode_image(str(synthetic_coco.val_images / info["file_name"]), mode=ImageReadMode.RGB)
    assert torch.equal(decode_image(str(tmp_path / "out" / f"{image_id:012d}.png")), original)


def test_missing_images_get_one_sentence(synthetic_coco, tmp_path, capsys):
    args = ["--annotations", synthetic_coco.val_json, "--images", tmp_path, "--out", tmp_path / "out"]
    assert main(get_args_parser().parse_args([str(a) for a in args])) == 1
    assert "does not exist; pass --images" in capsys.readouterr().err
