"""Detections in COCO terms beside the MLPerf reference's evaluation code: its `BoxList.resize` back to
the image's own size, `convert("xywh")` and `Masker` (paste at 0.5 with 1 pixel of padding).

Our model's detections (continuous boxes in the resized frame, `inclusive` under the reference
convention) go through `to_original_frame`, `encode_masks` and `xyxy_to_xywh`; the same
detections as the reference's inclusive boxes go through its code. Boxes within float rounding,
masks pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.box_ops import clip_boxes, inclusive_boxes
from model.detections import Detections
from reference_oracle import reference, requires_reference
from tests.model_helpers import batch_from
from train.evaluation import to_original_frame, xyxy_to_xywh
from train.mask_encoding import encode_masks

pytestmark = [requires_reference, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ORIGINAL = [(480, 640), (375, 500)]  # (h, w) of the source images
RESIZED = [(600, 800), (800, 1066)]  # after the reference resize (800 / 1333)


def test_boxes_and_masks_in_original_pixels_equal_the_references():
    g = torch.Generator().manual_seed(0)
    d = 12
    xy = torch.rand(2, d, 2, generator=g) * 700 - 20
    boxes = torch.cat([xy, xy + 2 + 300 * torch.rand(2, d, 2, generator=g) ** 2], dim=2)
    boxes = clip_boxes(boxes, torch.tensor(RESIZED), inclusive=True)  # detections are clipped: some to the edges
    mask_probs = torch.rand(2, d, 28, 28, generator=g)
    batch = batch_from(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), [[], []], [[], []], [[], []])
    batch.original_sizes = torch.tensor(ORIGINAL, dtype=torch.int32)
    batch.image_sizes = torch.tensor(RESIZED, dtype=torch.int32)
    batch.scales = batch.image_sizes.float() / batch.original_sizes.float()
    detections = Detections(boxes, torch.rand(2, d), torch.ones(2, d, dtype=torch.int64), mask_probs,
                            torch.tensor([d, d], dtype=torch.int32), inclusive=True)
    ours, paste, masks = to_original_frame(batch, detections)

    bounding_box = reference("structures.bounding_box")
    masker = reference("modeling.roi_heads.mask_head.inference").Masker(threshold=0.5, padding=1)
    for i, ((h, w), (rh, rw)) in enumerate(zip(ORIGINAL, RESIZED)):
        prediction = bounding_box.BoxList(inclusive_boxes(boxes[i]), (rw, rh)).resize((w, h))
        expected_xywh = prediction.convert("xywh").bbox
        np.testing.assert_allclose(xyxy_to_xywh(ours[i].numpy()), expected_xywh.numpy(), rtol=1e-6, atol=1e-4)
        pasted = masker([mask_probs[i][:, None]], [prediction])[0][:, 0]
        expected = [mask_utils.decode(mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))) for m in pasted]
        mine = [mask_utils.decode(rle) for rle in encode_masks(masks[i].numpy(), paste[i].numpy(), h, w)]
        assert all(np.array_equal(a, b) for a, b in zip(mine, expected))
        assert sum(int(m.sum()) for m in expected) > 0
