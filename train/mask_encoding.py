"""Mask probabilities -> COCO RLEs without pasting full-image masks (runs in evaluation workers).

The reference (torchvision's `paste_masks_in_image`, maskrcnn-benchmark's `Masker`) resizes
each 28x28 mask to its integer box, writes it into a zero image of the full size, thresholds
it, and the evaluator then RLE-encodes that image. Almost all of that time is spent on the
zeros. Here each mask goes through the same torchvision box expansion and the same
`F.interpolate` call, so the pixels inside the box are bit-identical, and the run lengths of
the full image are computed from the box-sized mask alone: everything outside it is zero.
"""

from __future__ import annotations

import signal

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks


def init_worker() -> None:
    """Process-pool initializer: one thread per worker, the workers are the parallelism.

    Ctrl-C and a terminal's hang-up reach every process of the terminal's group: the workers ignore
    them and keep their queue, and the trainer, which decides how to stop (train/interrupts.py), ends them.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def encode_masks(
    mask_probs: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5
) -> list[dict]:
    """COCO RLEs (counts as str) of `mask_probs` [N, M, M] pasted into boxes [N, 4] of one image.

    Boxes are xyxy float32 in the image's own pixels; the result equals thresholding
    `paste_masks_in_image(mask_probs[:, None], boxes, (height, width))` at `> threshold` and
    encoding each mask with `pycocotools.mask.encode`.
    """
    if len(mask_probs) == 0:
        return []
    padded, scale = expand_masks(torch.from_numpy(np.ascontiguousarray(mask_probs))[:, None], padding=1)
    paste_boxes = expand_boxes(torch.from_numpy(np.ascontiguousarray(boxes)), scale).to(torch.int64).tolist()
    counts = [
        _column_major_runs(_box_mask(mask, box, threshold), box, height, width)
        for mask, box in zip(padded, paste_boxes)
    ]
    rles = mask_utils.frPyObjects([{"counts": c, "size": [height, width]} for c in counts], height, width)
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def _box_mask(mask: torch.Tensor, box: list[int], threshold: float) -> np.ndarray:
    """The thresholded mask over the integer box, exactly as torchvision's `paste_mask_in_image` resizes it."""
    x0, y0, x1, y1 = box
    w = max(x1 - x0 + 1, 1)
    h = max(y1 - y0 + 1, 1)
    resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return (resized > threshold).numpy()


def _column_major_runs(box_mask: np.ndarray, box: list[int], height: int, width: int) -> list[int]:
    """Uncompressed COCO run lengths (column-major, zeros first) of a full image holding `box_mask` at `box`."""
    x0, y0 = box[0], box[1]
    # The part of the box inside the image, as in paste_mask_in_image.
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + box_mask.shape[1], width), min(y0 + box_mask.shape[0], height)
    if cx1 <= cx0 or cy1 <= cy0:
        return [height * width]
    # Full-height columns cx0..cx1, transposed so that ravel() walks them in COCO's order.
    columns = np.zeros((cx1 - cx0, height), dtype=bool)
    columns[:, cy0:cy1] = box_mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].T
    guarded = np.concatenate(([False], columns.ravel(), [False]))
    # Alternating starts and ends of runs of ones, as indices into the whole image.
    edges = np.flatnonzero(guarded[1:] != guarded[:-1]) + cx0 * height
    bounds = np.concatenate(([0], edges, [height * width]))
    counts = (bounds[1:] - bounds[:-1]).tolist()
    if counts[-1] == 0:  # pycocotools never writes a trailing empty run of zeros
        counts.pop()
    return counts
