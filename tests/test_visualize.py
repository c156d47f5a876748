"""tools/visualize.py and train/visualization.py on the shared synthetic val set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import ImageReadMode, decode_image

from tools.visualize import get_args_parser, main
import torchvision.transforms.v2.functional as TF

from train.visualization import GAP, HEADER_HEIGHT, MIN_PANEL_WIDTH, category_colors


def _as_results(coco, anns, score):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score,
         "segmentation": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in coco.annToRLE(a).items()}}
        for a in anns
    ]


def _upscaled(image):
    """The panel's picture of `image`: upscaled to MIN_PANEL_WIDTH by the same rule, computed here."""
    scale = max(1.0, MIN_PANEL_WIDTH / image.shape[2])
    size = [round(image.shape[1] * scale), round(image.shape[2] * scale)]
    return (TF.resize(image, size, antialias=True) if scale > 1 else image), scale


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
    upscaled, scale = _upscaled(original)
    height, width = upscaled.shape[1:]
    assert width >= MIN_PANEL_WIDTH and scale > 3  # the ~200 px synthetic images are drawn 4x larger
    picture = decode_image(str(tmp_path / "out" / f"{image_id:012d}.png"))
    assert picture.shape == (3, HEADER_HEIGHT + height, 2 * width + GAP)
    left, right = picture[:, HEADER_HEIGHT:, :width], picture[:, HEADER_HEIGHT:, width + GAP :]
    # A header above each panel, with different words: dark text on white.
    headers = picture[:, :HEADER_HEIGHT, :width], picture[:, :HEADER_HEIGHT, width + GAP :]
    for header in headers:
        assert (header < 100).all(dim=0).sum() > 50 and (header == 255).all(dim=0).float().mean() > 0.8
    assert not torch.equal(*headers)

    colors = category_colors(sorted(coco.getCatIds()))
    for half in (left, right):  # same objects on both sides: masks tinted, outlined in the class colour
        for a in anns:
            mask = torch.from_numpy(coco.annToMask(a).astype(bool))
            inside = torch.nn.functional.interpolate(mask[None, None].float(), size=[height, width])[0, 0].bool()
            assert (half != upscaled).any(dim=0)[inside].float().mean() > 0.9
            rows = inside.any(dim=1).nonzero()[:, 0]
            middle = int(rows[len(rows) // 2])
            leftmost = int(inside[middle].nonzero()[0, 0])  # the mask's left edge on its middle row
            assert tuple(half[:, middle, leftmost].tolist()) == colors[a["category_id"]]
    # Rows that no box (nor its label tag, above the box) reaches keep the image's pixels.
    drawn_rows = torch.zeros(height, dtype=torch.bool)
    for a in anns:
        top, bottom = a["bbox"][1] * scale, (a["bbox"][1] + a["bbox"][3]) * scale
        drawn_rows[max(int(top) - 2 * HEADER_HEIGHT, 0) : int(bottom) + 3] = True
    assert (~drawn_rows).any()
    assert torch.equal(left[:, ~drawn_rows], upscaled[:, ~drawn_rows])


def _closest_pair(colors):
    return min(sum((p - q) ** 2 for p, q in zip(a, b)) ** 0.5 for i, a in enumerate(colors) for b in colors[i + 1 :])


def test_classes_get_distinct_colours():
    sparse_ids = [1, 28, 44, 90, 3, 4, 5, 6, 7, 8]  # COCO ids, as a synthetic set has them
    colors = list(category_colors(sorted(sparse_ids)).values())
    assert _closest_pair(colors) > 70  # ten classes: no two alike (RGB distance)
    many = list(category_colors(list(range(1, 81))).values())
    assert len(set(many)) == 80 and _closest_pair(many[:18]) > 20


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
    picture = decode_image(str(tmp_path / "out" / f"{image_id:012d}.png"))
    assert torch.equal(picture[:, HEADER_HEIGHT:], _upscaled(original)[0])


def _one_sentence_error(capsys, argv) -> str:
    assert main(get_args_parser().parse_args([str(a) for a in argv])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_images_get_one_sentence(synthetic_coco, tmp_path, capsys):
    (tmp_path / "images").mkdir()  # a folder without the annotated images (and --out not inside it)
    args = ["--annotations", synthetic_coco.val_json, "--images", tmp_path / "images", "--out", tmp_path / "out"]
    assert "does not exist; pass --images" in _one_sentence_error(capsys, args)


def _good_entry(coco):
    ann = coco.loadAnns(coco.getAnnIds(iscrowd=False))[0]
    return _as_results(coco, [ann], 0.9)[0]


@pytest.mark.parametrize(
    "case, message",
    [
        ("a dict instead of a list", "holds a JSON dict, not a list of detections"),
        ("a row without bbox", "entry 1 has no bbox"),
        ("a string score", "entry 1 has score '0.9', not a number"),
        ("a bad RLE", "is not a COCO RLE"),
        ("an RLE of another size", "encode masks at the image's own size"),
        ("not JSON", "is not a readable COCO results JSON"),
    ],
)
def test_bad_predictions_are_one_sentence(case, message, synthetic_coco, tmp_path, capsys):
    coco = COCO(str(synthetic_coco.val_json))
    good = _good_entry(coco)
    bad = dict(good)
    rows = [good, bad]
    if case == "a row without bbox":
        del bad["bbox"]
    elif case == "a string score":
        bad["score"] = "0.9"
    elif case == "a bad RLE":
        counts = good["segmentation"]["counts"]
        bad["segmentation"] = {"size": good["segmentation"]["size"], "counts": counts[: len(counts) // 2]}  # truncated
    elif case == "an RLE of another size":
        h, w = good["segmentation"]["size"]
        taller = mask_utils.encode(np.zeros((h + 1, w), dtype=np.uint8, order="F"))  # one row too many
        bad["segmentation"] = {"size": [h + 1, w], "counts": taller["counts"].decode()}
    predictions = tmp_path / "results.json"
    text = json.dumps({"annotations": rows} if case == "a dict instead of a list" else rows)
    predictions.write_text(text if case != "not JSON" else text[:-5])
    args = ["--annotations", synthetic_coco.val_json, "--images", synthetic_coco.val_images,
            "--predictions", predictions, "--out", tmp_path / "out", "--num", "40"]
    assert message in _one_sentence_error(capsys, args)

