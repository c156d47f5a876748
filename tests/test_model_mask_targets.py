"""Mask targets rasterized on the device against pycocotools' rasterization of the same polygons.

The reference crops each instance's polygons to the proposal box, scales them into a 28x28
frame in float32 and rasterizes them with pycocotools (then merges the parts); we do the same
here with numpy and pycocotools, one RoI at a time, and compare with our batched targets, on
both of their paths (each RoI's own instance, or every edge of the image on the sync-free
path). tests/reference/ runs the reference's own `project_masks_on_boxes` beside them.
"""

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.mask_targets import polygon_mask_targets
from tests.model_helpers import batch_from

R = 28
# pycocotools' decode trips a numpy 2 deprecation (not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def pycocotools_target(parts: list[np.ndarray], box: np.ndarray) -> np.ndarray:
    """The reference's target: float32 crop and scale (its Python-float ratio applied in float32), then pycocotools."""
    x1, y1, x2, y2 = np.asarray(box, dtype=np.float32)
    scale = np.array([R / float(max(x2 - x1, 1)), R / float(max(y2 - y1, 1))], dtype=np.float32)
    framed = [((p.astype(np.float32) - np.array([x1, y1], np.float32)) * scale).flatten().tolist() for p in parts]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(framed, R, R)))


def random_polygon(rng: np.random.Generator, kind: str) -> list[np.ndarray]:
    center = rng.uniform(60, 140, size=2)
    if kind == "multipart":  # two disjoint parts, as COCO's occluded objects
        return [random_polygon(rng, "convex")[0] - [40, 0], random_polygon(rng, "convex")[0] + [40, 0]]
    if kind == "overlapping":  # two parts of one instance that overlap
        part = random_polygon(rng, "concave")[0]
        return [part, part + rng.uniform(-15, 15, 2)]
    n = int(rng.integers(5, 14))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radius = rng.uniform(2, 12, n) if kind == "small" else rng.uniform(15, 35, n)
    if kind == "concave":
        radius[::2] *= 0.4
    else:
        radius[:] = radius.mean()
    return [center + np.stack([np.cos(angles), np.sin(angles)], 1) * radius[:, None]]


def ours_vs_reference(instances: list[list[np.ndarray]], boxes: np.ndarray, instance_of_box: list[int], sync_free: bool):
    """Our targets for `boxes` (one image) and pycocotools' for the same boxes."""
    batch = batch_from(
        torch.zeros(1, 3, 200, 200),
        [[[0.0, 0.0, 1.0, 1.0]] * len(instances)],
        [[1] * len(instances)],
        [[[p.tolist() for p in parts] for parts in instances]],
    )
    ours = polygon_mask_targets(
        torch.tensor(boxes, dtype=torch.float32)[None],
        torch.tensor(instance_of_box)[None],
        batch.verts,
        batch.polys,
        batch.num_polys,
        R,
        sync_free,
    )[0].numpy()
    theirs = np.stack([pycocotools_target(instances[g], b) for g, b in zip(instance_of_box, boxes)])
    return ours, theirs


@pytest.mark.parametrize("sync_free", [False, True], ids=["own-instance", "every-edge"])
@pytest.mark.parametrize("kind", ["convex", "concave", "multipart", "overlapping", "small"])
def test_polygon_targets_equal_pycocotools(kind, sync_free):
    rng = np.random.default_rng(["convex", "concave", "multipart", "overlapping", "small"].index(kind))
    instances = [random_polygon(rng, kind) for _ in range(6)]
    boxes, owner = [], []
    for g, parts in enumerate(instances):
        points = np.concatenate(parts)
        extent = np.concatenate([points.min(0), points.max(0)])
        for _ in range(8):  # proposals around the instance: shifted and rescaled extents
            jitter = rng.uniform(-12, 12, 4)
            box = extent + jitter
            boxes.append([min(box[0], box[2] - 2), min(box[1], box[3] - 2), box[2], box[3]])
            owner.append(g)
    ours, theirs = ours_vs_reference(instances, np.array(boxes), owner, sync_free)
    assert np.array_equal(ours, theirs)
    assert theirs.sum() > 0


def test_overlapping_parts_take_their_union():
    """Two overlapping squares of one instance: pycocotools merges them, an even-odd fill would cancel the overlap."""
    a = np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0]])
    ours, theirs = ours_vs_reference([[a, a + 10]], np.array([[10.0, 10.0, 40.0, 40.0]]), [0], sync_free=True)
    assert np.array_equal(ours, theirs)
    assert ours[0, 14, 14] == 1  # inside both squares: frame (14.5, 14.5) is image (25.5, 25.5)


@pytest.mark.parametrize("sync_free", [False, True], ids=["own-instance", "every-edge"])
def test_rectangles_match_pycocotools_exactly(sync_free):
    rng = np.random.default_rng(3)
    instances, boxes, owner = [], [], []
    for g in range(10):
        x1, y1 = rng.uniform(10, 100, 2)
        x2, y2 = x1 + rng.uniform(5, 80), y1 + rng.uniform(5, 80)
        instances.append([np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])])
        for _ in range(4):
            bx1, by1 = rng.uniform(0, 100, 2)
            boxes.append([bx1, by1, bx1 + rng.uniform(20, 100), by1 + rng.uniform(20, 100)])
            owner.append(g)
    ours, theirs = ours_vs_reference(instances, np.array(boxes), owner, sync_free)
    assert np.array_equal(ours, theirs)
    assert theirs.sum() > 0


@pytest.mark.parametrize("sync_free", [False, True], ids=["own-instance", "every-edge"])
def test_an_instance_without_a_polygon_has_an_empty_target(sync_free):
    """Shard format 3 keeps an instance whose polygons were all unusable, as the reference keeps it
    (pycocotools, which the reference would call on its empty polygon list, raises instead)."""
    square = np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0]])
    instances = [[square], [], [square + 5]]
    boxes = np.array([[8.0, 8.0, 40.0, 40.0]] * 3)
    batch = batch_from(torch.zeros(1, 3, 64, 64), [[[0.0, 0.0, 1.0, 1.0]] * 3], [[1] * 3],
                       [[[p.tolist() for p in parts] for parts in instances]])
    ours = polygon_mask_targets(torch.tensor(boxes, dtype=torch.float32)[None], torch.arange(3)[None], batch.verts,
                                batch.polys, batch.num_polys, R, sync_free)[0].numpy()
    assert not ours[1].any()
    for g in (0, 2):
        assert np.array_equal(ours[g], pycocotools_target(instances[g], boxes[g])) and ours[g].any()
    with pytest.raises(IndexError):
        pycocotools_target([], boxes[1])
