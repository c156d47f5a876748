"""The COCO-like photo set: COCO's sizes and JPEG weight, annotations pycocotools reads and agrees with."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.photo_coco import HEIGHTS, WIDTH, make_photo_coco
from pipeline.sharding import shard_coco
from pipeline.shard_format import open_shard_set
from test_synthetic import _load_tool

NUM_IMAGES = 40


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return root, make_photo_coco(root, "train", NUM_IMAGES, seed=0, max_instances=60)


def test_images_have_coco_sizes_and_weigh_like_coco_jpegs(photos):
    root, json_path = photos
    coco = COCO(str(json_path))
    shapes, sizes, modes = [], [], set()
    for image in coco.dataset["images"]:
        path = root / "train2017" / image["file_name"]
        with Image.open(path) as jpeg:
            assert jpeg.format == "JPEG" and jpeg.size == (image["width"], image["height"])
            modes.add(jpeg.mode)
        shapes.append((image["height"], image["width"]))
        sizes.append(path.stat().st_size)
    for h, w in shapes:
        assert max(h, w) == WIDTH and HEIGHTS[0] <= min(h, w) <= HEIGHTS[1]
    assert any(h > w for h, w in shapes) and any(h < w for h, w in shapes)
    assert 70 * 1024 < np.mean(sizes) < 100 * 1024, np.mean(sizes)
    assert modes <= {"RGB", "L"} and "RGB" in modes


def test_annotations_are_coco_polygons_whose_box_and_area_pycocotools_confirms(photos):
    _, json_path = photos
    coco = COCO(str(json_path))
    assert len(coco.getCatIds()) == 80
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert max(per_image) == 60 and 3 < np.median(per_image) < 12
    for ann in coco.loadAnns(coco.getAnnIds())[:200]:
        image = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann)
        assert ann["area"] == mask.sum() and not ann["iscrowd"]
        xs = np.concatenate([p[0::2] for p in ann["segmentation"]])
        ys = np.concatenate([p[1::2] for p in ann["segmentation"]])
        assert ann["bbox"] == pytest.approx([xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()], abs=0.011)
        assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= image["width"] and ys.max() <= image["height"]


def test_the_set_shards_and_its_manifest_keeps_the_maxima(photos, tmp_path):
    root, json_path = photos
    shard_coco(root / "train2017", json_path, tmp_path, mode="train", samples_per_shard=16, seed=0)
    shard_set = open_shard_set(tmp_path)
    assert sum(shard_set.samples.values()) == NUM_IMAGES
    assert shard_set.max_instances == 60


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        make_photo_coco(tmp_path / name, "val", 3, seed=2)
    assert (tmp_path / "a" / "instances_val.json").read_bytes() == (tmp_path / "b" / "instances_val.json").read_bytes()
    for path in (tmp_path / "a" / "val2017").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / "val2017" / path.name).read_bytes()


def test_the_tool_writes_photos_and_refuses_scene_options(tmp_path):
    tool = _load_tool("make_synthetic_coco")
    parser = tool.get_args_parser()
    tool.main(parser.parse_args(["--photos", "--out", str(tmp_path), "--num-images", "2"]))
    assert len(json.loads((tmp_path / "instances_train.json").read_text())["images"]) == 2
    with pytest.raises(SystemExit, match="--num-classes"):
        tool.main(parser.parse_args(["--photos", "--out", str(tmp_path), "--num-classes", "3"]))
