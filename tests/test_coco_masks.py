"""RLE masks as labeling tools export them, turned into polygons, against pycocotools; and what COCO's
evaluation can score, against pycocotools itself.

- Every mask (random ones from hypothesis, holes, islands in holes, pixels touching at a corner),
  in both RLE forms (pycocotools' compressed string, and the uncompressed list that tools such as
  pycococreator and CVAT write), becomes a polygon that pycocotools fills to exactly the mask
  pycocotools decodes from the RLE: IoU 1.0.
- The device mask targets (model/mask_targets.py) of the polygon equal pycocotools' decode in the
  image's own frame, and pycocotools' rasterization of the same polygon in proposal frames.
- Damaged RLEs (hypothesis: any string, any list of counts) are refused, never decoded past their end.
- `scoring_problem` refuses exactly what pycocotools' COCOeval fails on, and passes what it scores.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from faults import floats
from model.mask_targets import polygon_mask_targets
from pipeline.coco_masks import SegmentationError, mask_polygon, polygon_iou, rle_counts, rle_polygon, scoring_problem
from pipeline.shard_format import open_shard_set, read_sample, sample_refs
from pipeline.sharding import RLE_CONVERTED
from pipeline.synthetic_coco import make_synthetic_coco
from tests.model_helpers import batch_from
from tests.test_model_mask_targets import R, pycocotools_target
from tests.train_runs import ENV, PYTHON, REPO, TINY, losses

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def compressed_rle(mask: np.ndarray) -> dict:
    """pycocotools' encode, its counts as the str a JSON file holds."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major runs starting with background, as pycococreator's binary_mask_to_rle writes them."""
    counts = []
    for index, (value, run) in enumerate(itertools.groupby(mask.ravel(order="F"))):
        if index == 0 and value:
            counts.append(0)
        counts.append(len(list(run)))
    return {"size": list(mask.shape), "counts": counts}


def pycocotools_fill(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon.ravel().tolist()], height, width)))


def shapes() -> dict[str, np.ndarray]:
    """Masks whose outlines are not one simple loop."""
    ring = np.zeros((40, 50), bool)
    ring[5:35, 5:45] = True
    ring[10:30, 10:40] = False
    ring[15:25, 20:30] = True  # an island in the hole
    ring[18:22, 23:27] = False  # and a hole in the island
    diagonal = np.zeros((6, 6), bool)
    diagonal[1, 1] = diagonal[2, 2] = diagonal[3, 3] = diagonal[2, 4] = True  # pixels touching at corners
    checker = np.indices((9, 9)).sum(0) % 2 == 0
    border = np.ones((7, 9), bool)  # touching every edge of the image
    border[3, 4] = False
    return {"ring": ring, "diagonal": diagonal, "checker": checker, "border": border}


@pytest.mark.parametrize("name", sorted(shapes()))
@pytest.mark.parametrize("encode", [compressed_rle, uncompressed_rle])
def test_an_rle_becomes_a_polygon_pycocotools_fills_to_exactly_its_mask(name, encode):
    mask = shapes()[name]
    height, width = mask.shape
    rle = encode(mask)
    polygon, decoded = rle_polygon(rle, height, width)
    theirs = mask_utils.decode(mask_utils.frPyObjects(rle, height, width) if isinstance(rle["counts"], list) else rle)
    assert np.array_equal(decoded, theirs.astype(bool))
    assert np.array_equal(pycocotools_fill(polygon, height, width), theirs)
    assert polygon_iou(polygon, rle, height, width) == 1.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 24).flatmap(lambda h: st.integers(1, 24).flatmap(
        lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(lambda v: np.array(v).reshape(h, w))
    )),
    st.booleans(),
)
def test_any_mask_converts_exactly(mask, compressed):
    height, width = mask.shape
    rle = compressed_rle(mask) if compressed else uncompressed_rle(mask)
    polygon, _ = rle_polygon(rle, height, width)
    if not mask.any():
        assert polygon.shape == (0, 2)
        return
    assert np.array_equal(pycocotools_fill(polygon, height, width), mask.astype(np.uint8))


def test_device_mask_targets_of_a_converted_mask_equal_pycocotools():
    """In the image's own frame (an R x R image, its box the whole image) the targets are the decoded
    mask; in proposal frames they are pycocotools' rasterization of the same polygon (all its edges
    axis-aligned, so exactly)."""
    ring = shapes()["ring"]
    mask = np.zeros((R, R), bool)
    mask[:, :] = np.kron(ring[5:35:2, 5:45:3][:R, :R], np.ones((2, 2), bool))[:R, :R]
    polygon = mask_polygon(mask)
    rng = np.random.default_rng(0)
    boxes = [[0.0, 0.0, float(R), float(R)]]
    for _ in range(15):
        x1, y1 = rng.uniform(-3, 10, 2)
        boxes.append([x1, y1, x1 + rng.uniform(8, 30), y1 + rng.uniform(8, 30)])
    batch = batch_from(torch.zeros(1, 3, R, R), [[[0.0, 0.0, 1.0, 1.0]]], [[1]], [[[polygon.tolist()]]])
    ours = polygon_mask_targets(
        torch.tensor(boxes, dtype=torch.float32)[None], torch.zeros(1, len(boxes), dtype=torch.int64),
        batch.verts, batch.polys, batch.num_polys, R,
    )[0].numpy() > 0
    assert np.array_equal(ours[0], mask)
    for target, box in zip(ours[1:], boxes[1:]):
        assert np.array_equal(target, pycocotools_target([polygon.astype(np.float64)], np.array(box)) > 0)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 30), st.integers(1, 30),
    st.one_of(
        st.text(max_size=40),
        st.text(alphabet=[chr(c) for c in range(48, 48 + 64)], max_size=40),
        st.lists(st.integers(-5, 2000), max_size=12),
    ),
)
def test_a_damaged_rle_is_refused_never_decoded_past_its_end(height, width, counts):
    segmentation = {"size": [height, width], "counts": counts}
    try:
        runs = rle_counts(segmentation, height, width)
    except SegmentationError:
        return
    assert runs.min(initial=0) >= 0 and runs.sum() == height * width
    ours = rle_polygon(segmentation, height, width)[1]
    theirs = mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width) if isinstance(counts, list)
                               else segmentation)
    assert np.array_equal(ours, theirs.astype(bool))


def test_an_rle_of_another_size_than_its_image_is_refused():
    rle = compressed_rle(np.ones((10, 12), bool))
    with pytest.raises(SegmentationError, match="not its image's"):
        rle_counts(rle, 12, 10)


# --- what COCO's evaluation can score -------------------------------------------------------------

IMAGE = {"id": 1, "file_name": "a.jpg", "height": 50, "width": 60}
SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
GOOD = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400.0, "iscrowd": 0,
        "segmentation": [SQUARE]}


def pycocotools_scores(ann: dict) -> bool:
    """Whether pycocotools' COCOeval scores a perfect detection against ground truth `ann` without an error."""
    gt = COCO()
    gt.dataset = {"images": [IMAGE], "annotations": [copy.deepcopy(ann)], "categories": [{"id": 1, "name": "x"}]}
    mask = np.zeros((50, 60), bool)
    mask[10:30, 10:30] = True
    detection = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9,
                 "segmentation": compressed_rle(mask)}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            evaluation = COCOeval(gt, gt.loadRes([detection]), "segm")
            evaluation.evaluate()
    except Exception:
        return False
    return True


CASES = {  # what pycocotools fails on: refused
    "empty segmentation": (dict(GOOD, segmentation=[]), "empty segmentation"),
    "an empty first polygon": (dict(GOOD, segmentation=[[]]), "first polygon of 0 points"),
    "a one-point first polygon": (dict(GOOD, segmentation=[[10.0, 10.0]]), "first polygon of 1 point "),
    "a two-point first polygon": (dict(GOOD, segmentation=[[10.0, 10.0, 30.0, 30.0], SQUARE]), "first polygon of 2"),
    "no area": ({k: v for k, v in GOOD.items() if k != "area"}, "'area'"),
    "no iscrowd": ({k: v for k, v in GOOD.items() if k != "iscrowd"}, "'iscrowd'"),
    "an RLE without counts": (dict(GOOD, segmentation={"size": [50, 60]}), "needs 'size' and 'counts'"),
}
SCORED = {  # what it scores as it is: passed
    "a later two-point polygon": dict(GOOD, segmentation=[SQUARE, [1.0, 1.0, 5.0, 5.0]]),
    "a later empty polygon": dict(GOOD, segmentation=[SQUARE, []]),
    "an RLE": dict(GOOD, segmentation=uncompressed_rle(np.pad(np.ones((20, 20), bool), ((10, 20), (10, 30))))),
    "a crowd RLE": dict(GOOD, iscrowd=1, segmentation=compressed_rle(np.ones((50, 60), bool))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_pycocotools_cannot_score_is_refused(case):
    ann, says = CASES[case]
    assert not pycocotools_scores(ann)
    assert says in scoring_problem(ann, IMAGE)


@pytest.mark.parametrize("case", sorted(SCORED))
def test_what_pycocotools_scores_passes(case):
    assert pycocotools_scores(SCORED[case])
    assert scoring_problem(SCORED[case], IMAGE) is None


def test_what_would_hang_or_exhaust_pycocotools_is_refused_without_trying_it():
    """A NaN coordinate made pycocotools allocate until the OOM killer came, and counts that do not
    cover the image hung it (tried by hand, not here): refused, with polygons far off the image."""
    nan = dict(GOOD, segmentation=[[10.0, 10.0, 30.0, float("nan"), 10.0, 30.0]])
    far = dict(GOOD, segmentation=[[10.0, 10.0, 30.0, 1e30, 10.0, 30.0]])
    short = dict(GOOD, segmentation={"size": [50, 60], "counts": [610, 20, 30, 20, 30]})
    odd = dict(GOOD, segmentation=[SQUARE[:-1]])
    assert "not finite or lies far off" in scoring_problem(nan, IMAGE)
    assert "not finite or lies far off" in scoring_problem(far, IMAGE)
    assert "cover 710 pixels" in scoring_problem(short, IMAGE)
    assert "even-length" in scoring_problem(odd, IMAGE)


@settings(max_examples=120, deadline=None)
@given(
    area=st.one_of(st.none(), floats(allow_nan=True), st.integers(-5, 5000), st.text(max_size=3)),
    bbox=st.one_of(st.lists(floats(-10, 80), min_size=0, max_size=5), st.none()),
    segmentation=st.one_of(
        st.lists(st.lists(floats(-20, 80, allow_nan=False), max_size=10), max_size=3),
        st.lists(st.lists(st.one_of(floats(), st.integers(-10, 100), st.text(max_size=2)), max_size=8), max_size=2),
        st.fixed_dictionaries({"size": st.just([50, 60]), "counts": st.lists(st.integers(0, 3000), max_size=4)}),
    ),
    iscrowd=st.sampled_from([0, 1, None]),
)
def test_any_annotation_is_either_refused_in_words_or_scored(area, bbox, segmentation, iscrowd):
    ann = {"id": 7, "image_id": 1, "category_id": 1, "bbox": bbox, "area": area, "iscrowd": iscrowd,
           "segmentation": segmentation}
    problem = scoring_problem(ann, IMAGE)
    if problem is None:
        assert pycocotools_scores(ann)
    else:
        assert isinstance(problem, str) and problem


# --- a labeling tool's export, through the real command lines ---------------------------------------


@pytest.mark.parametrize("form", ["rle", "rle-list"])
def test_make_synthetic_coco_writes_the_masks_of_its_polygons_as_rle(form, tmp_path):
    """`--masks rle|rle-list`: the same images, each non-crowd mask the RLE of the polygon set's mask."""
    polygons = COCO(str(make_synthetic_coco(tmp_path / "polygons", "val", 6, image_size=(64, 80))))
    rles = COCO(str(make_synthetic_coco(tmp_path / form, "val", 6, image_size=(64, 80), masks=form)))
    assert polygons.getAnnIds() == rles.getAnnIds()
    for ann_id in polygons.getAnnIds():
        original, exported = polygons.anns[ann_id], rles.anns[ann_id]
        if original["iscrowd"]:
            assert exported == original
            continue
        assert isinstance(exported["segmentation"]["counts"], str if form == "rle" else list)
        assert np.array_equal(rles.annToMask(exported), polygons.annToMask(original))

def test_an_rle_export_is_sharded_exactly_and_trains_on_its_masks(synthetic_coco, tmp_path):
    """The synthetic train set's instances exported as RLE masks, half compressed and half as count
    lists: every one is stored as a polygon that fills to its mask, and training sees them."""
    coco = COCO(str(synthetic_coco.train_json))
    data = json.loads(synthetic_coco.train_json.read_text())
    masks = {}
    for index, ann in enumerate(a for a in data["annotations"] if not a["iscrowd"]):
        mask = coco.annToMask(ann).astype(bool)
        ann["segmentation"] = compressed_rle(mask) if index % 2 else uncompressed_rle(mask)
        masks[ann["id"]] = mask
    export = tmp_path / "instances_train.json"
    export.write_text(json.dumps(data))
    shards = tmp_path / "shards"
    sharded = subprocess.run(
        [PYTHON, str(REPO / "tools" / "shard_coco.py"), "--images", str(synthetic_coco.train_images),
         "--annotations", str(export), "--out", str(shards), "--mode", "train", "--workers", "2"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert sharded.returncode == 0, sharded.stderr
    assert "RLE mask converted to an exact polygon" in sharded.stdout
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["rle_masks"]["converted"] == manifest["repaired"][RLE_CONVERTED] > 0
    assert manifest["rle_masks"]["iou_min"] == 1.0

    # Each stored instance's polygon, filled by pycocotools, is its annotation's mask (matched by box).
    anns_by_image = {}
    for ann in data["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    checked = 0
    for refs in sample_refs(open_shard_set(shards)).values():
        for ref in refs:
            sample = read_sample(ref)
            for instance, box in enumerate(sample.boxes):
                rows = sample.polys[sample.polys[:, 0] == instance]
                polygon = np.concatenate([sample.verts[first:end] for _, first, end in rows])
                filled = pycocotools_fill(polygon, sample.height, sample.width).astype(bool)
                owner = next(a for a in anns_by_image[sample.image_id] if a["id"] in masks and np.allclose(
                    [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]], box))
                assert np.array_equal(filled, masks[owner["id"]])
                checked += 1
    assert checked == manifest["rle_masks"]["converted"]

    run = tmp_path / "run"
    trained = subprocess.run(
        [PYTHON, str(REPO / "train" / "main.py"), "--config", str(REPO / "configs" / "demo.yaml"), "--data", str(shards),
         *TINY, "solver.max_iter=2", "eval.every_epochs=0", f"output_dir={run}"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    logged = losses(run)
    assert all(logged[i]["loss_mask"] > 0 and logged[i]["loss_box_reg"] > 0 for i in (1, 2)), logged
