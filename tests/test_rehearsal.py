"""The COCO-scale synthetic set (pipeline/scale_coco.py) and the rehearsal of the data path on it (tools/rehearse_coco.py)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.scale_coco import MAX_OBJECTS, make_scale_coco


def test_the_scale_set_has_coco_statistics_and_linked_jpegs_of_the_listed_sizes(tmp_path):
    stats = make_scale_coco(tmp_path, num_images=400)
    coco = COCO(str(tmp_path / "instances_train.json"))
    images, annotations = coco.dataset["images"], coco.dataset["annotations"]
    assert (stats["images"], stats["annotations"]) == (len(images), len(annotations)) and len(images) == 400
    per_image = np.bincount([coco.getImgIds().index(a["image_id"]) for a in annotations], minlength=400)
    assert (per_image == 0).sum() == 3 and per_image.max() == MAX_OBJECTS  # 0.86% of 400 empty, one with 93
    assert 6.5 < len(annotations) / 400 < 8.5
    assert 0.25 < np.mean([a["category_id"] == 1 for a in annotations]) < 0.35 and len(coco.getCatIds()) == 80
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        image = coco.imgs[annotation["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= image["width"] + 0.01 and y + h <= image["height"] + 0.01
        if annotation["iscrowd"]:  # an uncompressed RLE of its box, as COCO stores crowds
            assert mask_utils.area(coco.annToRLE(annotation)) == annotation["area"] == w * h
        else:
            xs = [v for p in annotation["segmentation"] for v in p[0::2]]
            assert (min(xs), round(max(xs) - min(xs), 2)) == (x, w) and all(len(p) >= 16 for p in annotation["segmentation"])
    for image in images[:20]:
        path = tmp_path / "train2017" / image["file_name"]
        with Image.open(path) as decoded:
            assert decoded.size == (image["width"], image["height"]) and decoded.format == "JPEG"
        assert path.stat().st_nlink > 1  # a hard link to its size's template
    again = tmp_path / "again"
    make_scale_coco(again, num_images=400)
    assert (again / "instances_train.json").read_bytes() == (tmp_path / "instances_train.json").read_bytes()


def test_the_rehearsal_shards_verifies_and_opens_the_set_as_ranks(tmp_path):
    from tools.rehearse_coco import get_args_parser, main

    out = tmp_path / "rehearsal"
    args = ["--out", str(out), "--images", "60", "--world-sizes", "2", "--ranks", "2", "--backends", "torch",
            "--json", str(tmp_path / "report.json")]
    report = main(get_args_parser().parse_args(args))
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["shards"]["samples"] == 60 - 1  # the reference's filter drops the image without annotations
    for step in ("make", "shard", "verify", "open"):
        assert report[step]["wall_s"] > 0 and report[step]["cpu_s"] > 0 and report[step]["peak_mb"] > 50
    ranks = report["ranks"][1:]
    assert [(r["world_size"], r["rank"]) for r in ranks] == [(2, 0), (2, 1)]
    for row in ranks:
        assert row["samples"] == 59 and row["batch_size"] == 2  # 4 images over 2 ranks (the default recipe batch)
        assert row["startup_s"] == row["open"]["wall_s"] + row["first_batch"]["wall_s"]
    assert not any(out.iterdir())  # the set and its shards are gone
