"""COCO segmentations as annotation files hold them: checks, and RLE masks turned into exact polygons.

Two jobs, one place for what a `segmentation` may be:

- `scoring_problem(ann, image)`: what would stop COCO's evaluation (pycocotools, faster-coco-eval)
  from scoring a ground-truth annotation, or make it score a wrong mask without a word, or None.
  Tried with both libraries (tests/test_coco_masks.py): an empty `segmentation`, a first polygon
  of one or two points (pycocotools reads two points as a box, then fails), a missing `area` or
  `iscrowd` make pycocotools raise; a NaN polygon coordinate makes it allocate until the OOM
  killer ends the process; an RLE whose counts do not add up to its size hangs it; an RLE of
  another size than its image, or a polygon of an odd number of values, is scored as another
  mask. Later polygons of fewer than three points are scored as they are, so they pass.
  `scoring_refusal` runs it over a file: the evaluator (train/evaluation.py) and the sharder's
  `--mode eval` refuse a file with such an annotation in one sentence naming it.
- `rle_polygon(segmentation, height, width)`: an RLE mask (`{"size": [h, w], "counts": ...}`,
  compressed string or uncompressed list, as labeling tools export instance masks) as one polygon
  whose fill is exactly the mask, so RLE instances reach the device mask targets (model/mask_targets.py)
  through the same polygon path as COCO's own.

How the polygon is exact. Every edge of the mask's pixel boundary (between a pixel inside and
one outside, on the integer grid) is traced into closed loops: outer outlines and the outlines of
holes. The loops are joined into one polygon by bridges, each walked there and back along the
same horizontal and vertical segments. pycocotools fills a polygon by the parity of its edge
crossings (each column toggles at every edge that crosses it), and an edge walked twice toggles
twice, so the bridges add nothing and every hole stays a hole: the fill is the mask, pixel for
pixel (IoU 1.0 against pycocotools' decode, measured on every converted instance by the sharder
and on random masks in tests/test_coco_masks.py). A hole could not be a polygon of its own: an
instance's polygons are combined by their union (pycocotools' `merge`, the reference's rule), which
would fill it. All edges are axis-aligned, so the crop, scale and flip of the mask targets keep the
bridges' two walks identical.

The price is vertices: an outline follows every pixel step (a smooth 100-pixel blob takes a few
hundred vertices where an annotator's polygon takes about 20), which the manifest's `max_vertices`
and the per-batch padding of vertices (pipeline/batch.py) carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from pycocotools import mask as mask_utils

RLE_FIELDS = ("size", "counts")


class SegmentationError(ValueError):
    """A segmentation that is not a valid COCO polygon list or RLE; the message says what is wrong."""


# ----------------------------------------------------------------------------- RLE


def rle_counts(segmentation: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """The run lengths of an RLE of an image `height` x `width`, checked; SegmentationError if unusable.

    pycocotools decodes without checking (a damaged RLE hangs it or reads past its end), so the
    compressed form is decoded here, as its `rleFrString` does: each count in 6-bit characters
    from '0', five bits of value each, 0x20 meaning more follow, the last one's 0x10 the sign,
    and counts after the third stored as the difference to the one two before.
    """
    if not all(field in segmentation for field in RLE_FIELDS):
        raise SegmentationError("an RLE needs 'size' and 'counts'")
    size, counts = segmentation["size"], segmentation["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)):
        raise SegmentationError(f"the RLE's size {size!r} is not [height, width]")
    if size != [height, width]:
        raise SegmentationError(f"the RLE's size {size} is not its image's [height, width] {[height, width]}")
    if isinstance(counts, str):
        runs = _decode_counts(counts)
    elif isinstance(counts, list) and all(type(v) is int and 0 <= v <= height * width for v in counts):
        runs = np.asarray(counts, dtype=np.int64)
    else:
        raise SegmentationError("the RLE's counts are neither a compressed string nor a list of non-negative integers")
    total = int(runs.sum())
    if total != height * width:
        raise SegmentationError(f"the RLE's counts cover {total} pixels, not its {height}x{width} = {height * width}")
    return runs


def _decode_counts(text: str) -> np.ndarray:
    """`rleFrString` in whole-array steps (a COCO mask's string has thousands of characters)."""
    if not text.isascii():
        raise SegmentationError("the RLE's counts hold characters outside COCO's compressed alphabet")
    chars = np.frombuffer(text.encode(), np.uint8).astype(np.int64) - 48
    if not len(chars):
        return np.zeros(0, np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise SegmentationError("the RLE's counts hold characters outside COCO's compressed alphabet")
    last = chars & 0x20 == 0  # the character that ends a number
    if not last[-1]:
        raise SegmentationError("the RLE's counts string ends in the middle of a number")
    number = np.concatenate([[0], np.cumsum(last)[:-1]])  # which number each character belongs to
    first_char = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    digit = np.arange(len(chars)) - first_char[number]
    if digit.max() > 12:
        raise SegmentationError("the RLE's counts hold a number too long for a run length")
    values = np.zeros(len(first_char), np.int64)
    np.add.at(values, number, (chars & 0x1F) << (5 * digit))
    negative = chars[last] & 0x10 != 0
    values[negative] -= np.int64(1) << (5 * (digit[last][negative] + 1))
    # From the fourth count on, each is stored as the difference to the count two before it.
    counts = values.copy()
    counts[3::2] = np.cumsum(values[1::2])[1:]
    counts[4::2] = np.cumsum(values[2::2])[1:]
    if counts.min() < 0:
        raise SegmentationError("the RLE's counts decode to a negative run")
    return counts


def rle_mask(counts: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [height, width] from checked run lengths (column-major runs, starting with background)."""
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(width, height).T


# ----------------------------------------------------------------------------- mask -> polygon

# The unit boundary edges' directions, numbered so that direction + 1 is a right turn on screen.
_STEPS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])  # right, down, left, up (x, y; y grows downwards)


def mask_polygon(mask: np.ndarray) -> np.ndarray:
    """float32 [V, 2] (x, y): one polygon whose parity fill is exactly `mask` (bool [h, w]); [0, 2] if empty.

    Outlines run with the mask on their right (outer ones clockwise on screen, holes the other way).
    """
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return np.zeros((0, 2), np.float32)
    top, left = rows[0], columns[0]
    loops = boundary_loops(mask[top : rows[-1] + 1, left : columns[-1] + 1])  # traced in the mask's extent
    return (np.asarray(join_loops(loops), dtype=np.float32) + [left, top]).astype(np.float32)


def boundary_loops(mask: np.ndarray) -> list[np.ndarray]:
    """The mask's pixel outlines as closed loops of int [N, 2] corner points (x, y), collinear points left out."""
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), bool)
    padded[1:-1, 1:-1] = mask
    # Horizontal edges at grid row y between pixel rows y-1 and y; vertical ones at grid column x.
    below = padded[1:, 1:-1]
    horizontal = below != padded[:-1, 1:-1]  # [h+1, w]
    left = padded[1:-1, :-1]
    vertical = left != padded[1:-1, 1:]  # [h, w+1]
    hy, hx = np.nonzero(horizontal)
    vy, vx = np.nonzero(vertical)
    rightwards = below[hy, hx]  # the pixel below is inside: run left to right, the mask on the right
    downwards = left[vy, vx]  # the pixel left of it is inside: run downwards
    starts = np.concatenate([
        np.stack([np.where(rightwards, hx, hx + 1), hy], 1),
        np.stack([vx, np.where(downwards, vy, vy + 1)], 1),
    ])
    direction = np.concatenate([np.where(rightwards, 0, 2), np.where(downwards, 1, 3)])
    ends = starts + _STEPS[direction]
    num_edges = len(starts)
    if num_edges == 0:
        return []

    # The edges leaving each corner point (one, or two where pixels touch diagonally).
    columns = width + 1
    start_key = starts[:, 1] * columns + starts[:, 0]
    end_key = ends[:, 1] * columns + ends[:, 0]
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    count = np.searchsorted(sorted_keys, end_key, side="right") - first
    option_a = order[first]
    option_b = order[np.minimum(first + 1, num_edges - 1)]
    # Where two pixels touch only at a corner, two edges leave it: take the right turn. Any choice
    # traces the same edges, so the same fill; one fixed rule keeps the result deterministic.
    turn_right = (direction + 1) % 4
    take_b = (count == 2) & (direction[option_a] != turn_right)
    following = np.where(take_b, option_b, option_a)

    # Walk the loops in one pass over plain lists (numpy indexing per element would cost 10x).
    next_edge = following.tolist()
    loop_of = [-1] * num_edges
    walk: list[int] = []
    bounds = []
    for edge in range(num_edges):
        if loop_of[edge] >= 0:
            continue
        begin = len(walk)
        while loop_of[edge] < 0:
            loop_of[edge] = len(bounds)
            walk.append(edge)
            edge = next_edge[edge]
        bounds.append((begin, len(walk)))
    walk_edges = np.asarray(walk)
    corner = direction[walk_edges] != direction[np.roll(walk_edges, 1)]  # the direction changes here
    loops = []
    for begin, end in bounds:
        path = walk_edges[begin:end]
        turns = corner[begin:end].copy()
        turns[0] = direction[path[0]] != direction[path[-1]]
        loops.append(starts[path[turns]])
    return loops


def join_loops(loops: list[np.ndarray]) -> list[tuple[int, int]]:
    """One vertex list: each loop walked from its first point back to it, the loops linked by
    L-shaped bridges (horizontal, then vertical) that the return walk retraces, so each bridge
    edge is walked twice and toggles nothing."""
    points: list[tuple[int, int]] = []

    def add(point: tuple[int, int]) -> None:
        if not points or points[-1] != point:
            points.append(point)

    anchors = [tuple(int(v) for v in loop[0]) for loop in loops]
    for index, loop in enumerate(loops):
        if index:
            add((anchors[index][0], anchors[index - 1][1]))  # the bridge's corner
        for point in loop:
            add((int(point[0]), int(point[1])))
        if len(loops) > 1:
            add(anchors[index])  # back at the loop's start, to leave it along the bridge
    for index in range(len(loops) - 1, 0, -1):
        add((anchors[index][0], anchors[index - 1][1]))
        if index > 1:
            add(anchors[index - 1])
    if len(points) > 1 and points[-1] == points[0]:
        points.pop()
    return points


def rle_polygon(segmentation: Mapping[str, Any], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [V, 2] polygon, bool [h, w] mask) of an RLE segmentation; SegmentationError if it is unusable."""
    mask = rle_mask(rle_counts(segmentation, height, width), height, width)
    return mask_polygon(mask), mask


def polygon_iou(polygon: np.ndarray, segmentation: Mapping[str, Any], height: int, width: int) -> float:
    """IoU of pycocotools' fill of `polygon` [V, 2] with pycocotools' decode of the RLE `segmentation` (checked)."""
    ours = mask_utils.frPyObjects([polygon.ravel().astype(np.float64).tolist()], height, width)
    theirs = mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list) \
        else segmentation
    return float(mask_utils.iou(ours, [theirs], [0])[0, 0])


@dataclass
class RleConversions:
    """The RLE instance masks a sharding run turned into polygons, each with its IoU against pycocotools' decode."""

    ious: list[float] = field(default_factory=list)
    vertices: list[int] = field(default_factory=list)

    def polygons(self, ann: Mapping[str, Any], height: int, width: int) -> list[list[float]]:
        """Annotation `ann`'s RLE as polygon rows ([] for an empty mask); SegmentationError names the annotation."""
        try:
            polygon, _ = rle_polygon(ann["segmentation"], height, width)
        except SegmentationError as e:
            raise SegmentationError(f"annotation {ann.get('id')} has an unusable RLE segmentation ({e})") from None
        if not len(polygon):
            return []
        self.ious.append(polygon_iou(polygon, ann["segmentation"], height, width))
        self.vertices.append(len(polygon))
        return [polygon.ravel().tolist()]

    def summary(self) -> dict[str, Any]:
        """The manifest's `rle_masks` entry."""
        converted = len(self.ious)
        return {
            "converted": converted,
            "method": "exact pixel outline, holes bridged into one polygon (pipeline/coco_masks.py)",
            "iou_min": min(self.ious) if converted else None,
            "iou_mean": sum(self.ious) / converted if converted else None,
            "vertices_max": max(self.vertices) if converted else None,
            "vertices_mean": sum(self.vertices) / converted if converted else None,
        }


# ----------------------------------------------------------------------------- what evaluation can score


def scoring_problem(ann: Mapping[str, Any], image: Mapping[str, Any] | None) -> str | None:
    """Why COCO's evaluation cannot score ground-truth annotation `ann` of `image` as it stands, or None."""
    if image is None:
        return f"names image {ann.get('image_id')!r}, which the file does not list"
    if not _is_number(ann.get("area")):
        return "has no finite 'area' (COCOeval reads it to sort objects by size)"
    if type(ann.get("iscrowd")) not in (int, bool):
        return "has no 'iscrowd' 0 or 1"
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return "has a 'bbox' that is not 4 finite numbers"
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        try:
            rle_counts(segmentation, image["height"], image["width"])
        except SegmentationError as e:
            return f"has an unusable RLE segmentation ({e})"
        return None
    if not isinstance(segmentation, list) or not segmentation:
        return "has an empty segmentation (no polygon and no RLE)"
    # pycocotools walks every polygon edge in fifth-pixel steps: a coordinate far off the image
    # (or not finite) would take memory without bound, so coordinates stay within an image's size of it.
    limit = max(image["height"], image["width"])
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) % 2:
            return "has a polygon that is not an even-length list of x, y numbers"
        try:
            total = sum(polygon)  # C loops: a COCO val file has millions of coordinates
        except TypeError:
            return "has a polygon that is not an even-length list of x, y numbers"
        if not math.isfinite(total) or (polygon and (min(polygon) < -limit or max(polygon) > 2 * limit)):
            size = f"{image['width']}x{image['height']}"
            return f"has a polygon coordinate that is not finite or lies far off its {size} image"
    if len(segmentation[0]) < 6:
        points = len(segmentation[0]) // 2
        return f"has a first polygon of {points} point{'s' * (points != 1)} (pycocotools needs at least 3 to score it)"
    return None


def scoring_refusal(data: Mapping[str, Any], source: str, fix: str) -> str | None:
    """One sentence naming the first annotation of COCO instances `data` that COCO's evaluation cannot
    score (and how many more), ending in `fix`; None when every one can be scored."""
    images = {image.get("id"): image for image in data.get("images", []) if isinstance(image, dict)}
    found = []
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict):
            found.append(("?", "is not a JSON object"))
            continue
        problem = scoring_problem(ann, images.get(ann.get("image_id")))
        if problem:
            found.append((ann.get("id"), problem))
    if found:
        (first, problem), rest = found[0], [str(ann_id) for ann_id, _ in found[1:]]
        more = f", and {len(rest)} more cannot be scored ({', '.join(rest[:5])}{', ...' if len(rest) > 5 else ''})" \
            if rest else ""
        return (
            f"{source}: annotation {first} {problem}{more}; COCO's evaluation cannot score "
            f"{'them' if rest else 'it'}: {fix}"
        )
    return None


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)
