"""The synthetic COCO generator: determinism, COCO structure and the cases it promises to contain."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.coco_categories import COCO_CATEGORIES
from pipeline.synthetic_coco import make_synthetic_coco


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_coco(synthetic_coco) -> COCO:
    return COCO(str(synthetic_coco.train_json))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_synthetic_coco(tmp_path / name, "val", 5, seed=seed, image_size=(64, 80))
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_coco_file_naming_and_image_sizes(synthetic_coco, train_coco):
    images = train_coco.dataset["images"]
    assert len(images) == 24 and synthetic_coco.train_ids == tuple(sorted(train_coco.getImgIds()))
    for image in images:
        assert image["file_name"] == f"{image['id']:012d}.jpg"
        with Image.open(synthetic_coco.train_images / image["file_name"]) as jpeg:
            assert jpeg.format == "JPEG"
            assert jpeg.size == (image["width"], image["height"])
    orientations = {image["height"] > image["width"] for image in images}
    assert orientations == {True, False}, "expected both portrait and landscape images"
    val_ids = {image["id"] for image in json.loads(synthetic_coco.val_json.read_text())["images"]}
    assert not val_ids & {image["id"] for image in images}


def test_categories_are_sparse_real_coco_ids(train_coco, tmp_path):
    ids = sorted(train_coco.getCatIds())
    assert len(ids) == 8 and ids != list(range(1, 9))
    real = {cid: name for cid, name, _ in COCO_CATEGORIES}
    assert all(real[c["id"]] == c["name"] for c in train_coco.dataset["categories"])
    three = json.loads(make_synthetic_coco(tmp_path, "train", 2, num_classes=3, image_size=(64, 80)).read_text())
    assert len(three["categories"]) == 3


def test_bbox_and_area_follow_the_segmentation(train_coco):
    for ann in train_coco.dataset["annotations"]:
        mask = train_coco.annToMask(ann)
        assert ann["area"] == pytest.approx(mask.sum())
        if ann["iscrowd"]:
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == pytest.approx([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
        else:
            xs = np.concatenate([p[0::2] for p in ann["segmentation"]])
            ys = np.concatenate([p[1::2] for p in ann["segmentation"]])
            assert ann["bbox"] == pytest.approx([xs.min(), ys.min(), np.ptp(xs), np.ptp(ys)], abs=0.011)


def _is_concave(polygon: list[float]) -> bool:
    points = np.asarray(polygon).reshape(-1, 2)
    edges = np.roll(points, -1, axis=0) - points
    following = np.roll(edges, -1, axis=0)
    turns = edges[:, 0] * following[:, 1] - edges[:, 1] * following[:, 0]
    return bool((turns > 0).any() and (turns < 0).any())


def test_contains_the_cases_coco_readers_must_handle(synthetic_coco, train_coco):
    anns = train_coco.dataset["annotations"]
    polygons = [a for a in anns if not a["iscrowd"]]
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], str) for a in crowds)  # RLE
    assert any(len(a["segmentation"]) > 1 for a in polygons), "expected a multi-part object"
    assert any(_is_concave(p) for a in polygons for p in a["segmentation"]), "expected a concave polygon"
    assert any(a["area"] < 64 for a in polygons), "expected a tiny object"

    per_image = {i: train_coco.loadAnns(train_coco.getAnnIds(imgIds=i)) for i in train_coco.getImgIds()}
    assert any(not a for a in per_image.values()), "expected an image without annotations"
    assert any(a and all(x["iscrowd"] for x in a) for a in per_image.values()), "expected a crowd-only image"
    modes = {Image.open(synthetic_coco.train_images / i["file_name"]).mode for i in train_coco.dataset["images"]}
    assert modes == {"L", "RGB"}


def test_objects_are_saturated_class_colours_on_a_muted_background(synthetic_coco, train_coco):
    """Objects' pixels are the annotated polygons: the class colours live inside them, and only there."""
    for image in train_coco.dataset["images"]:
        anns = train_coco.loadAnns(train_coco.getAnnIds(imgIds=image["id"]))
        hsv = np.asarray(Image.open(synthetic_coco.train_images / image["file_name"]).convert("HSV"))
        if hsv[..., 1].max() == 0:  # a grayscale JPEG has no colour to check
            continue
        covered = np.zeros(hsv.shape[:2], bool)
        for ann in anns:
            mask = train_coco.annToMask(ann).astype(bool)
            covered |= mask
            if ann["area"] >= 100 and not ann["iscrowd"]:
                assert hsv[..., 1][mask].mean() > 140, f"object {ann['id']} is not in its class colour"
        assert hsv[..., 1][~covered].mean() < 80, f"image {image['id']} background is too colourful"


def test_full_size_jpegs_weigh_like_coco(tmp_path):
    json_path = make_synthetic_coco(tmp_path, "train", 3, seed=1, grayscale_fraction=0)
    sizes = [p.stat().st_size for p in (tmp_path / "train2017").glob("*.jpg")]
    assert 80_000 < np.mean(sizes) < 200_000
    assert all(max(i["height"], i["width"]) == 640 for i in json.loads(json_path.read_text())["images"])


def test_bad_options_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_coco(tmp_path, num_classes=81)
    with pytest.raises(ValueError, match="empty_fraction"):
        make_synthetic_coco(tmp_path, empty_fraction=1.5)


def test_cli_documents_every_option_and_writes_a_set(tmp_path):
    tool = _load_tool("make_synthetic_coco")
    parser = tool.get_args_parser()
    assert all(action.help for action in parser._actions)
    tool.main(parser.parse_args(["--out", str(tmp_path), "--split", "val", "--num-images", "2", "--image-size", "64", "80"]))
    assert len(COCO(str(tmp_path / "instances_val.json")).getImgIds()) == 2
    assert len(list((tmp_path / "val2017").glob("*.jpg"))) == 2
    with pytest.raises(SystemExit, match="num_classes"):
        tool.main(parser.parse_args(["--out", str(tmp_path), "--num-classes", "0"]))
