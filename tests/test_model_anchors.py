"""Anchors against a numpy transcription of maskrcnn-benchmark's `generate_anchors` and `grid_anchors`.

The transcription follows modeling/rpn/anchor_generator.py of the MLPerf reference
(mlcommons/training, maskrcnn): `_whctrs`, `_mkanchors`, `_ratio_enum`, `_scale_enum`,
`generate_anchors` and `AnchorGenerator.grid_anchors`, in the reference's inclusive pixel
convention; ours are continuous boxes, the same pixels with x2 + 1 and y2 + 1.
"""

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from model import build_model
from model.rpn import Anchors
from tests.model_helpers import model_config


def _whctrs(anchor):
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)


def _mkanchors(ws, hs, x_ctr, y_ctr):
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))


def _ratio_enum(anchor, ratios):
    w, h, x_ctr, y_ctr = _whctrs(anchor)
    ws = np.round(np.sqrt(w * h / ratios))
    return _mkanchors(ws, np.round(ws * ratios), x_ctr, y_ctr)


def _scale_enum(anchor, scales):
    w, h, x_ctr, y_ctr = _whctrs(anchor)
    return _mkanchors(w * scales, h * scales, x_ctr, y_ctr)


def reference_generate_anchors(stride, sizes, aspect_ratios):
    anchor = np.array([1, 1, stride, stride], dtype=np.float64) - 1
    anchors = _ratio_enum(anchor, np.array(aspect_ratios, dtype=np.float64))
    scales = np.array(sizes, dtype=np.float64) / stride
    return np.vstack([_scale_enum(anchors[i], scales) for i in range(anchors.shape[0])]).astype(np.float32)


def reference_grid_anchors(grid_size, stride, base_anchors):
    h, w = grid_size
    shifts_x = np.arange(0, w * stride, stride, dtype=np.float32)
    shifts_y = np.arange(0, h * stride, stride, dtype=np.float32)
    shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = np.stack([shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel()], axis=1)
    return (shifts[:, None, :] + base_anchors[None]).reshape(-1, 4)


def inclusive_to_continuous(boxes):
    return boxes + np.array([0, 0, 1, 1], dtype=np.float32)


# The reference bucket 800x1344 (landscape) at strides 4..64 (P6 is a stride-2 max pool of P5).
GRIDS = [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)]


def test_every_level_equals_the_reference_formula():
    rpn = model_config().rpn
    anchors = Anchors(tuple(rpn.anchor_sizes), tuple(rpn.aspect_ratios), tuple(rpn.anchor_strides))
    ours = anchors(GRIDS, torch.device("cpu"))
    for level, (size, stride, grid) in enumerate(zip(rpn.anchor_sizes, rpn.anchor_strides, GRIDS)):
        base = reference_generate_anchors(stride, (size,), rpn.aspect_ratios)
        expected = inclusive_to_continuous(reference_grid_anchors(grid, stride, base))
        assert ours[level].dtype == torch.float32
        np.testing.assert_array_equal(ours[level].numpy(), expected, err_msg=f"P{level + 2}")


def test_anchors_by_hand():
    rpn = model_config().rpn
    p2, p3, _, p5, _ = Anchors(tuple(rpn.anchor_sizes), tuple(rpn.aspect_ratios), tuple(rpn.anchor_strides))(
        GRIDS, torch.device("cpu")
    )
    # P2, cell (0, 0), ratio 0.5: base window 4x4, ws = round(sqrt(32)) = 6, hs = round(3) = 3,
    # x 8 -> 48x24 around the inclusive centre 1.5: [-22, -10, 25, 13], continuous [-22, -10, 26, 14].
    assert p2[0].tolist() == [-22.0, -10.0, 26.0, 14.0]
    assert p2[1].tolist() == [-14.0, -14.0, 18.0, 18.0]  # ratio 1: 32x32 centred on (2, 2)
    # P3, cell (row 1, column 2), ratio 2: ws = round(sqrt(32)) = 6, hs = 12, x 8 -> 48x96 around
    # (3.5, 3.5) + shift (16, 8): [-20 + 16, -44 + 8, 28 + 16, 52 + 8].
    assert p3[(1 * 168 + 2) * 3 + 2].tolist() == [-4.0, -36.0, 44.0, 60.0]
    # P5, ratio 0.5: ws = round(sqrt(2048)) = 45, hs = round(22.5) = 22 (numpy rounds half to
    # even), x 8 -> 360x176, not torchvision's 362x182.
    width, height = (p5[0, 2] - p5[0, 0]).item(), (p5[0, 3] - p5[0, 1]).item()
    assert (width, height) == (360.0, 176.0)


def test_torchvision_generator_gives_torchvision_anchors():
    sizes, ratios, strides = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64)
    grids = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]  # torchvision infers each stride as image // grid
    ours = Anchors(sizes, ratios, strides, "torchvision")(grids, torch.device("cpu"))
    generator = AnchorGenerator(tuple((s,) for s in sizes), (ratios,) * 5)
    features = [torch.zeros(1, 1, h, w) for h, w in grids]
    (theirs,) = generator(ImageList(torch.zeros(1, 3, 128, 192), [(128, 192)]), features)
    torch.testing.assert_close(torch.cat(ours), theirs, rtol=0, atol=0)


def test_anchors_are_cached_per_shape_and_the_generator_is_checked():
    anchors = build_model(model_config()).proposals.anchors
    first = anchors(GRIDS, torch.device("cpu"))
    assert anchors(GRIDS, torch.device("cpu")) is first
    assert anchors(GRIDS[::-1], torch.device("cpu")) is not first
    with pytest.raises(ValueError, match="model.convention must be one of"):
        Anchors((32,), (1.0,), (4,), "detectron2")
