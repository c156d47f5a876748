"""Mask probabilities -> COCO RLEs without pasting full-image masks (runs in evaluation workers).

The reference (torchvision's `paste_masks_in_image`, maskrcnn-benchmark's `Masker`) resizes
each 28x28 mask to its integer box, writes it into a zero image of the full size, thresholds
it, and the evaluator then RLE-encodes that image. Almost all of that time is spent on the
zeros. Here each mask goes through the same torchvision box expansion and the same
`F.interpolate` call, so the pixels inside the box are bit-identical, and the run lengths of
the full image are computed from the box-sized mask alone: everything outside it is zero.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from train.interrupts import leave_terminal_signals_to_parent


def init_worker() -> None:
    """Process-pool initializer: one thread per worker, the workers are the parallelism.

    Ctrl-C and a terminal's hang-up are the trainer's: the workers keep their queue, and the trainer ends them.
    """
    torch.set_num_threads(1)
    leave_terminal_signals_to_parent()


def encode_images(work: list[tuple[np.ndarray, np.ndarray, int, int]], threshold: float = 0.5) -> list[list[dict]]:
    """`encode_masks` of each image's (mask_probs, boxes, height, width): one worker task per batch."""
    return [encode_masks(masks, boxes, height, width, threshold) for masks, boxes, height, width in work]


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
    box_masks = [_box_mask(mask, box, threshold) for mask, box in zip(padded.split(1), paste_boxes)]
    counts = column_major_runs(box_masks, paste_boxes, height, width)
    rles = mask_utils.frPyObjects([{"counts": c, "size": [height, width]} for c in counts], height, width)
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def _box_mask(mask: torch.Tensor, box: list[int], threshold: float) -> np.ndarray:
    """The thresholded mask [1, 1, M, M] over the integer box, exactly as torchvision's `paste_mask_in_image` resizes it."""
    x0, y0, x1, y1 = box
    w = max(x1 - x0 + 1, 1)
    h = max(y1 - y0 + 1, 1)
    resized = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
    return resized.numpy()[0, 0] > threshold  # numpy's comparison: a fraction of a torch op's overhead


def column_major_runs(box_masks: list[np.ndarray], boxes: list[list[int]], height: int, width: int) -> list[list[int]]:
    """Uncompressed COCO run lengths (column-major, zeros first) of full images each holding one box mask.

    `box_masks[i]` lies at integer box `boxes[i]` (x0, y0, x1, y1; it may reach past the
    image, which crops it, as paste_mask_in_image does). Only the boxes' own pixels are read,
    and all masks of an image go through one pass of numpy: each visible column of each box,
    guarded by a zero above and below, is laid out in one buffer, so that every change in it
    is a run's start or end, found for all masks at once and placed in its own image.
    """
    area = height * width
    starts, rows, columns, pieces = [], [], [], []
    for mask, (x0, y0, _, _) in zip(box_masks, boxes):
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = max(min(x0 + mask.shape[1], width), cx0), max(min(y0 + mask.shape[0], height), cy0)
        starts.append(cx0 * height + cy0)  # where the visible part's first column starts in the image
        rows.append(cy1 - cy0)
        columns.append(cx1 - cx0 if cy1 > cy0 else 0)
        pieces.append(mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0])
    rows, columns = np.array(rows), np.array(columns)
    sizes = columns * (rows + 2)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    guarded = np.zeros(offsets[-1], dtype=bool)
    for piece, offset, size, span in zip(pieces, offsets.tolist(), sizes.tolist(), rows.tolist()):
        if size:
            guarded[offset : offset + size].reshape(-1, span + 2)[:, 1:-1] = piece.T  # one column per row
    changes = np.flatnonzero(guarded[1:] != guarded[:-1]) + 1
    owner = np.searchsorted(offsets, changes, side="right") - 1
    column, row = np.divmod(changes - offsets[owner], rows[owner] + 2)
    # Alternating starts and ends of runs of ones, as indices into each mask's whole image.
    edges = np.array(starts)[owner] + column * height + row - 1
    # A run that fills a column to the image's bottom edge and goes on at the next column's top
    # (a box as tall as the image) ends where the next one starts: one run, not two.
    joined = np.flatnonzero((edges[1:] == edges[:-1]) & (owner[1:] == owner[:-1]))
    if len(joined):
        keep = np.ones(len(edges), dtype=bool)
        keep[joined] = keep[joined + 1] = False
        edges, owner = edges[keep], owner[keep]
    bounds = np.searchsorted(owner, np.arange(len(box_masks) + 1)).tolist()
    gaps, edges = np.diff(edges).tolist(), edges.tolist()
    counts = []
    for first, end in zip(bounds[:-1], bounds[1:]):
        if first == end:
            counts.append([area])
            continue
        runs = [edges[first], *gaps[first : end - 1], area - edges[end - 1]]
        if runs[-1] == 0:  # pycocotools never writes a trailing empty run of zeros
            runs.pop()
        counts.append(runs)
    return counts
