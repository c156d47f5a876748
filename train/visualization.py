"""Pictures of ground truth and predictions a person can read: masks, outlines, boxes, class names.

`write_visualizations` writes one PNG per image: the ground truth alone, the predictions alone,
or both side by side (ground truth left, predictions right) when both are given. Predictions
are COCO results entries (`image_id`, `category_id`, `bbox` xywh, `score`, optional
`segmentation` RLE), as `train.evaluation.coco_results` makes them and tools/evaluate.py
--results writes them; they are checked first, and a bad entry is one sentence naming it.

Each panel is upscaled to at least `MIN_PANEL_WIDTH` pixels (small images stay legible) and
has a header saying what it shows. Masks are filled translucently and outlined, boxes drawn
in the class's colour (a palette of distinct colours, by the category's rank in the data set),
and each instance gets a label (class name, and score for predictions) on a filled tag placed
above its box, moved down where it would cover an earlier tag. torchvision draws the masks and
boxes; the labels and headers are drawn with PIL here because torchvision's labels need a font
file and sit inside the box, where small objects' labels cover each other.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections import defaultdict
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from pipeline.coco_masks import scoring_problem
from train.inference import ImageError, read_image

GAP = 8  # pixels of white between the two halves of a side-by-side picture
MIN_PANEL_WIDTH = 640  # panels narrower than this are upscaled to it
FONT_SIZE = 16
HEADER_HEIGHT = FONT_SIZE + 12
OUTLINE = 2  # mask outline thickness in (upscaled) pixels
# Distinct colours (Tableau 20 without its greys, strong shades first): neighbouring classes
# never look alike, and none disappears on grey photos.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
    (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229),
)
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


class VisualizationError(ValueError):
    """Inputs that cannot be drawn (missing images, unreadable predictions); the message says how to fix it."""


def write_visualizations(
    annotations_file: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    predictions: str | Path | Sequence[dict[str, Any]] | None = None,
    show_ground_truth: bool = True,
    num_images: int = 8,
    score_threshold: float = 0.5,
) -> list[Path]:
    """Draw the first `num_images` images (by id) and return the PNG paths written to `out_dir`.

    `predictions` is a COCO results JSON file or its entries; detections scoring below
    `score_threshold` are left out. With `show_ground_truth=False` only predictions are drawn.
    """
    by_image = _predictions_by_image(predictions, score_threshold) if predictions is not None else None
    if by_image is None and not show_ground_truth:
        raise VisualizationError("nothing to draw: pass predictions, or keep the ground truth")
    coco = quiet_coco(annotations_file)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    colors = category_colors(sorted(names))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image_id in sorted(coco.getImgIds())[:num_images]:
        info = coco.loadImgs(image_id)[0]
        image = _read_image(Path(image_dir) / info["file_name"])
        panels = []
        if show_ground_truth:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            panels.append(
                draw_instances(
                    image,
                    [a["bbox"] for a in anns],
                    [names[a["category_id"]] + (" (crowd)" if a["iscrowd"] else "") for a in anns],
                    [colors[a["category_id"]] for a in anns],
                    [_ground_truth_mask(coco, a, annotations_file) for a in anns],
                    header=f"ground truth: {len(anns)} object{'s' * (len(anns) != 1)}",
                )
            )
        if by_image is not None:
            dets = by_image.get(image_id, [])
            panels.append(
                draw_predictions(image, dets, names, colors, score_threshold, source=_source(predictions))
            )
        path = out_dir / f"{image_id:012d}.png"
        write_png(side_by_side(panels), str(path))
        written.append(path)
    return written


def draw_predictions(
    image: torch.Tensor,
    entries: Sequence[Mapping[str, Any]],
    names: Mapping[int, str],
    colors: Mapping[int, tuple[int, int, int]],
    score_threshold: float,
    source: str = "the predictions",
) -> torch.Tensor:
    """One panel of COCO results entries (checked by `check_results`) over `image`."""
    masks = None
    if entries and all("segmentation" in d for d in entries):
        masks = [_decode_rle(d, image.shape[1:], source) for d in entries]
    return draw_instances(
        image,
        [d["bbox"] for d in entries],
        [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in entries],
        [colors.get(d["category_id"], _extra_color(d["category_id"])) for d in entries],
        masks,
        header=f"predictions (score >= {score_threshold:.2f}): {len(entries)}",
    )


def draw_instances(
    image: torch.Tensor,
    boxes_xywh: Sequence[Sequence[float]],
    labels: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    masks: Sequence[np.ndarray] | None,
    header: str,
) -> torch.Tensor:
    """`image` (uint8 [3, H, W]) upscaled to MIN_PANEL_WIDTH, with masks filled and outlined, boxes and
    labels in each instance's colour, and `header` in a band above."""
    scale = max(1.0, MIN_PANEL_WIDTH / image.shape[2])
    size = [round(image.shape[1] * scale), round(image.shape[2] * scale)]
    canvas = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True) if scale > 1 else image
    if len(boxes_xywh):
        if masks is not None:
            filled = _upscale_masks(masks, size)
            canvas = draw_segmentation_masks(canvas, filled, alpha=0.4, colors=list(colors))
            canvas = draw_segmentation_masks(canvas, _outlines(filled), alpha=1.0, colors=list(colors))
        boxes = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4) * scale
        boxes[:, 2:] += boxes[:, :2]
        canvas = draw_bounding_boxes(canvas, boxes, colors=list(colors), width=2)
        canvas = _draw_labels(canvas, boxes.tolist(), labels, colors)
    return _with_header(canvas, header)


def category_colors(category_ids: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """A colour per category, by its rank in `category_ids` (the data set's, sorted)."""
    return {c: PALETTE[i] if i < len(PALETTE) else _extra_color(i) for i, c in enumerate(category_ids)}


def _extra_color(index: int) -> tuple[int, int, int]:
    """Past the palette: golden-ratio hue steps, far from their neighbours'."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def side_by_side(panels: list[torch.Tensor]) -> torch.Tensor:
    """Panels of one height left to right with a white gap between them."""
    if len(panels) == 1:
        return panels[0]
    gap = torch.full((3, panels[0].shape[1], GAP), 255, dtype=torch.uint8)
    return torch.cat([panels[0], gap, panels[1]], dim=2)


def quiet_coco(annotations_file: str | Path) -> COCO:
    """pycocotools' COCO index without its 'loading annotations into memory...' chatter."""
    try:
        with redirect_stdout(StringIO()):
            return COCO(str(annotations_file))
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError) as e:  # not JSON, or another shape
        raise VisualizationError(
            f"{annotations_file} is not a COCO instances JSON ({' '.join(str(e).split())[:120]}); "
            "pass the annotations, e.g. instances_val2017.json, and detections with --predictions"
        ) from None


def _ground_truth_mask(coco: COCO, ann: dict[str, Any], annotations_file: str | Path) -> np.ndarray:
    """pycocotools' mask of `ann`, after the check that keeps pycocotools from failing or hanging on it."""
    problem = scoring_problem(ann, coco.imgs.get(ann["image_id"]))
    if problem:
        raise VisualizationError(f"{annotations_file}: annotation {ann['id']} {problem}; fix or remove it in the file")
    return coco.annToMask(ann)


def _upscale_masks(masks: Sequence[np.ndarray], size: list[int]) -> torch.Tensor:
    stacked = torch.from_numpy(np.stack(masks).astype(np.uint8))[:, None].float()
    return F.interpolate(stacked, size=size, mode="nearest")[:, 0].bool()


def _outlines(masks: torch.Tensor) -> torch.Tensor:
    """The pixels of each mask within OUTLINE pixels of its edge."""
    outside = (~masks).float()[:, None]
    near_outside = F.max_pool2d(outside, kernel_size=2 * OUTLINE + 1, stride=1, padding=OUTLINE)[:, 0] > 0
    return masks & near_outside


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)  # PIL's own scalable font: no font file needed


def _draw_labels(
    canvas: torch.Tensor, boxes_xyxy: list[list[float]], labels: Sequence[str], colors: Sequence[tuple[int, int, int]]
) -> torch.Tensor:
    """A filled tag per box, above its top-left corner (inside when at the top), shifted down past earlier tags."""
    picture = TF.to_pil_image(canvas)
    draw, font = ImageDraw.Draw(picture), _font()
    placed: list[tuple[float, float, float, float]] = []
    width, height = picture.size
    for (x1, y1, _, _), label, color in zip(boxes_xyxy, labels, colors):
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        w, h = right - left + 6, bottom - top + 4
        x = min(max(x1, 0), max(width - w, 0))
        y = y1 - h if y1 - h >= 0 else max(y1, 0)
        while any(_overlap((x, y, x + w, y + h), other) for other in placed) and y + 2 * h <= height:
            y += h
        placed.append((x, y, x + w, y + h))
        draw.rectangle((x, y, x + w, y + h), fill=color)
        text = (0, 0, 0) if sum(c * k for c, k in zip(color, (0.299, 0.587, 0.114))) > 150 else (255, 255, 255)
        draw.text((x + 3 - left, y + 2 - top), label, fill=text, font=font)
    return TF.pil_to_tensor(picture)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _with_header(canvas: torch.Tensor, header: str) -> torch.Tensor:
    band = Image.new("RGB", (canvas.shape[2], HEADER_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(band).text((6, 6), header, fill=(0, 0, 0), font=_font())
    return torch.cat([TF.pil_to_tensor(band), canvas], dim=1)


def _read_image(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise VisualizationError(f"{path} does not exist; pass --images, the folder holding the annotated images")
    try:
        return read_image(path, upright=False)  # annotations are in the stored pixels' frame, EXIF tag or not
    except ImageError as e:
        raise VisualizationError(f"{e}; replace it with the data set's original file") from None


def _decode_rle(entry: Mapping[str, Any], image_size: torch.Size, source: str) -> np.ndarray:
    rle = entry["segmentation"]
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):  # uncompressed runs
            compressed = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            compressed = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        mask = mask_utils.decode(compressed)
        # pycocotools decodes some damaged strings without a word (reading past their end):
        # only a mask that encodes back to the same runs is the one the file meant.
        if mask_utils.encode(np.asfortranarray(mask))["counts"] != compressed["counts"]:
            raise ValueError("its runs do not cover the image exactly")
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise VisualizationError(
            f"{source}: the segmentation of the detection on image {entry['image_id']} is not a COCO RLE "
            f"({type(e).__name__}: {e}); write it as {{'size': [h, w], 'counts': '...'}} (pycocotools.mask.encode)"
        ) from None
    if tuple(mask.shape) != tuple(image_size):
        raise VisualizationError(
            f"{source}: the segmentation of the detection on image {entry['image_id']} is {tuple(mask.shape)}, "
            f"but the image is {tuple(image_size)}; encode masks at the image's own size"
        )
    return mask


def check_results(entries: Any, source: str) -> list[dict[str, Any]]:
    """`entries` as COCO results (a list of objects with image_id, category_id, bbox, score), or one sentence saying what is wrong."""
    hint = "a COCO results file is a list of {image_id, category_id, bbox: [x, y, w, h], score[, segmentation]}"
    if not isinstance(entries, list):
        raise VisualizationError(f"{source} holds a JSON {type(entries).__name__}, not a list of detections; {hint}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise VisualizationError(f"{source}: entry {i} is a {type(entry).__name__}, not an object; {hint}")
        missing = [k for k in RESULT_KEYS if k not in entry]
        if missing:
            raise VisualizationError(f"{source}: entry {i} has no {', '.join(missing)}; {hint}")
        if not _is_number(entry["score"]):
            raise VisualizationError(f"{source}: entry {i} has score {entry['score']!r}, not a number; {hint}")
        box = entry["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise VisualizationError(f"{source}: entry {i} has bbox {box!r}, not four finite numbers; {hint}")
        if not isinstance(entry["image_id"], int) or isinstance(entry["image_id"], bool):
            raise VisualizationError(f"{source}: entry {i} has image_id {entry['image_id']!r}, not an integer; {hint}")
    return entries


def _source(predictions: str | Path | Sequence[dict[str, Any]]) -> str:
    return str(predictions) if isinstance(predictions, (str, Path)) else "the predictions"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _predictions_by_image(
    predictions: str | Path | Sequence[dict[str, Any]], score_threshold: float
) -> dict[int, list[dict[str, Any]]]:
    source = _source(predictions)
    if isinstance(predictions, (str, Path)):
        try:
            predictions = json.loads(Path(predictions).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise VisualizationError(
                f"{source} is not a readable COCO results JSON ({e}); write one with tools/evaluate.py --results"
            ) from e
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for entry in check_results(predictions, source):
        if entry["score"] >= score_threshold:
            by_image[entry["image_id"]].append(entry)
    return by_image
