"""The geometry both backends share, against the reference's own formula and hand-worked cases."""

import numpy as np
import torch

from pipeline.batch import bucket_shapes, flip_boxes, flip_vertices, resized_size


def reference_get_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """maskrcnn-benchmark's Resize.get_size, transcribed (float maths, Python round)."""
    size = min_size
    min_original, max_original = float(min(width, height)), float(max(width, height))
    if max_original / min_original * size > max_size:
        size = int(round(max_size * min_original / max_original))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def test_resized_size_matches_the_reference_rule():
    rng = np.random.default_rng(0)
    shapes = [(480, 640), (640, 480), (320, 640), (640, 320), (800, 1333), (1, 1000), (427, 640), (500, 500)]
    shapes += [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(3000)]
    for min_size, max_size in [(800, 1333), (160, 267), (96, 160)]:
        for h, w in shapes:
            assert resized_size(h, w, min_size, max_size) == reference_get_size(h, w, min_size, max_size), (h, w)


def test_resized_size_rounds_ties_to_even_like_python():
    # 1333 * 320 / 640 = 666.5: Python's round gives 666, so the longer side is 1332.
    assert resized_size(320, 640, 800, 1333) == (666, 1332)


def test_resized_size_works_on_tensors():
    h, w = resized_size(torch.tensor(480), torch.tensor(640), 800, 1333)
    assert (int(h), int(w)) == (800, 1066)


def test_buckets_at_reference_sizes_are_the_configured_ones():
    assert bucket_shapes(800, 1333, 32, [[800, 1344], [1344, 800]]) == {
        "landscape": (800, 1344),
        "portrait": (1344, 800),
    }


def test_buckets_for_small_sizes_are_derived_from_min_and_max_size():
    assert bucket_shapes(160, 267, 32, [[800, 1344], [1344, 800]]) == {
        "landscape": (160, 288),
        "portrait": (288, 160),
    }


def test_every_resized_image_fits_its_bucket():
    # Up to 10:1 (COCO's extremes are about 6:1); past ~30:1 the reference's rounding can
    # exceed max_size, which the loaders report instead of cropping (test_pipeline_geometry).
    buckets = bucket_shapes(800, 1333, 32, [[800, 1344], [1344, 800]])
    rng = np.random.default_rng(1)
    for h, w in rng.integers(100, 3000, (2000, 2)):
        if max(h, w) > 10 * min(h, w):
            continue
        new_h, new_w = resized_size(int(h), int(w), 800, 1333)
        bucket = buckets["landscape" if h <= w else "portrait"]
        assert new_h <= bucket[0] and new_w <= bucket[1]


def test_flip_mirrors_boxes_and_moves_vertices_as_the_reference():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    assert flip_boxes(boxes, 100).tolist() == [[70.0, 5.0, 90.0, 25.0]]  # x -> W - x: the mirror image
    verts = torch.tensor([[10.0, 5.0], [30.0, 25.0]])
    assert flip_vertices(verts, 100).tolist() == [[89.0, 5.0], [69.0, 25.0]]  # x -> W - x - 1: maskrcnn-benchmark's
