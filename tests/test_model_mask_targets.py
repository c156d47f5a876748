"""Mask targets rasterized on the device against pycocotools' rasterization of the same polygons.

The reference crops each instance's polygons to the proposal box, scales them into a 28x28
frame and rasterizes them with pycocotools (then merges the parts); we do the same here, one
RoI at a time, and compare with our batched targets.
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
    x1, y1, x2, y2 = box
    scale = np.array([R / max(x2 - x1, 1.0), R / max(y2 - y1, 1.0)])
    framed = [((p - [x1, y1]) * scale).flatten().tolist() for p in parts]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(framed, R, R)))


def random_polygon(rng: np.random.Generator, kind: str) -> list[np.ndarray]:
    center = rng.uniform(60, 140, size=2)
    if kind == "multipart":  # two disjoint parts, as COCO's occluded objects
        return [random_polygon(rng, "convex")[0] - [40, 0], random_polygon(rng, "convex")[0] + [40, 0]]
    n = int(rng.integers(5, 14))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radius = rng.uniform(15, 35, n)
    if kind == "concave":
        radius[::2] *= 0.4
    else:
        radius[:] = radius.mean()
    return [center + np.stack([np.cos(angles), np.sin(angles)], 1) * radius[:, None]]


def ours_vs_reference(instances: list[list[np.ndarray]], boxes: np.ndarray, instance_of_box: list[int]):
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
    )[0].numpy()
    theirs = np.stack([pycocotools_target(instances[g], b) for g, b in zip(instance_of_box, boxes)])
    return ours, theirs


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


@pytest.mark.parametrize("kind", ["convex", "concave", "multipart"])
def test_polygon_targets_match_pycocotools(kind):
    rng = np.random.default_rng({"convex": 0, "concave": 1, "multipart": 2}[kind])
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
    ours, theirs = ours_vs_reference(instances, np.array(boxes), owner)
    ious = [iou(o > 0, t > 0) for o, t in zip(ours, theirs)]
    assert np.mean(ious) >= 0.97, np.mean(ious)
    assert theirs.sum() > 0


def test_rectangles_match_pycocotools_exactly():
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
    ours, theirs = ours_vs_reference(instances, np.array(boxes), owner)
    assert np.array_equal(ours > 0, theirs > 0)
    assert theirs.sum() > 0
