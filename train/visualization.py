"""Pictures of ground truth and predictions: boxes, masks and class names, drawn by torchvision.

`write_visualizations` writes one PNG per image: the ground truth alone, the predictions alone,
or both side by side (ground truth left, predictions right) when both are given. Predictions
are COCO results entries (`bbox` xywh, `segmentation` RLE, `score`, `category_id`), as
`train.evaluation.coco_results` makes them and tools/evaluate.py --results writes them.
"""

from __future__ import annotations

import colorsys
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import ImageReadMode, decode_image, write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

GAP = 8  # pixels of white between the two halves of a side-by-side picture


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
    coco = COCO(str(annotations_file))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    by_image = _predictions_by_image(predictions, score_threshold) if predictions is not None else None
    if by_image is None and not show_ground_truth:
        raise VisualizationError("nothing to draw: pass predictions, or keep the ground truth")
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
                    [a["category_id"] for a in anns],
                    [coco.annToMask(a) for a in anns],
                )
            )
        if by_image is not None:
            dets = by_image.get(image_id, [])
            panels.append(
                draw_instances(
                    image,
                    [d["bbox"] for d in dets],
                    [f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in dets],
                    [d["category_id"] for d in dets],
                    [mask_utils.decode(d["segmentation"]) for d in dets]
                    if all("segmentation" in d for d in dets)
                    else None,
                )
            )
        path = out_dir / f"{image_id:012d}.png"
        write_png(_side_by_side(panels), str(path))
        written.append(path)
    return written


def draw_instances(
    image: torch.Tensor,
    boxes_xywh: Sequence[Sequence[float]],
    labels: Sequence[str],
    category_ids: Sequence[int],
    masks: Sequence[np.ndarray] | None,
) -> torch.Tensor:
    """`image` (uint8 [3, H, W]) with masks filled and boxes outlined and labelled, one colour per category."""
    if not len(boxes_xywh):
        return image
    colors = [_category_color(c) for c in category_ids]
    if masks is not None:
        stacked = torch.from_numpy(np.stack(masks).astype(bool))
        image = draw_segmentation_masks(image, stacked, alpha=0.45, colors=colors)
    boxes = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return draw_bounding_boxes(image, boxes, labels=list(labels), colors=colors, width=2)


def _read_image(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise VisualizationError(f"{path} does not exist; pass --images, the folder holding the annotated images")
    return decode_image(str(path), mode=ImageReadMode.RGB)


def _predictions_by_image(
    predictions: str | Path | Sequence[dict[str, Any]], score_threshold: float
) -> dict[int, list[dict[str, Any]]]:
    if isinstance(predictions, (str, Path)):
        try:
            predictions = json.loads(Path(predictions).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VisualizationError(
                f"{predictions} is not a readable COCO results JSON ({e}); write one with tools/evaluate.py --results"
            ) from e
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for entry in predictions:
        if entry["score"] >= score_threshold:
            by_image[entry["image_id"]].append(entry)
    return by_image


def _category_color(category_id: int) -> tuple[int, int, int]:
    """A saturated colour per category, far from its neighbours' (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((category_id * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _side_by_side(panels: list[torch.Tensor]) -> torch.Tensor:
    if len(panels) == 1:
        return panels[0]
    gap = torch.full((3, panels[0].shape[1], GAP), 255, dtype=torch.uint8)
    return torch.cat([panels[0], gap, panels[1]], dim=2)
