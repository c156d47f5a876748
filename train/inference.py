"""A trained model on plain images: the config a weights file implies, and detections in COCO terms.

`config_for_weights` is how the tools (evaluate, predict) get the model config: the one saved
in a trainer checkpoint unless `--config` names another, with overrides on top. `detect` runs
the model on a `Batch` (pipeline/images.py builds one from decoded images) and maps its
detections to each image's own pixels with the evaluator's code (`to_original_frame`), masks
encoded as COCO RLEs by `train.mask_encoding`; `result_entries` turns them into COCO results
entries with the category's id and name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image

from model.weights import WeightsFile
from pipeline.batch import Batch
from train.config import REFERENCE_CONFIG, Config, load_config, load_saved_config
from train.evaluation import to_original_frame
from train.mask_encoding import encode_masks

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def config_for_weights(weights: WeightsFile, config_path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """The config to build the model for `weights`, then `overrides` on top.

    `config_path` given: that file. Otherwise the run config a trainer checkpoint carries, or
    configs/reference.yaml with what the weights need (torchvision's: stride in the 3x3 conv,
    RGB normalization, its anchors).
    """
    if config_path is not None:
        return load_config(config_path, overrides)
    if weights.config is not None:
        return load_saved_config(weights.config, f"checkpoint {weights.path}", overrides)
    return load_config(REFERENCE_CONFIG, [*weights.model_overrides(), *overrides])


def read_image(path: str | Path, upright: bool = True) -> torch.Tensor:
    """A JPEG or PNG as uint8 RGB [3, H, W]; `upright`: turned by its EXIF orientation, as photo viewers show it.

    A 16-bit PNG decodes to uint16: scaled to 8 bits, the range the model and the drawing code take.
    """
    image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=upright)
    return TF.to_dtype(image, torch.uint8, scale=True)


@dataclass
class ImageDetections:
    """One image's detections in its own pixels."""

    boxes_xyxy: np.ndarray  # [N, 4] float32
    scores: np.ndarray  # [N] float32
    labels: np.ndarray  # [N] int64 contiguous 1..K
    rles: list[dict]  # N COCO RLEs of the full image


@torch.inference_mode()
def detect(model: torch.nn.Module, batch: Batch, mask_threshold: float = 0.5) -> list[ImageDetections]:
    """`model` (in eval mode) on `batch`, each image's detections mapped back to its original pixels."""
    detections = model(batch)
    counts = detections.num_detections.tolist()
    boxes, paste, masks = to_original_frame(batch, detections)
    boxes, paste, masks = boxes.cpu().numpy(), paste.cpu().numpy(), masks.cpu().numpy()
    scores, labels = detections.scores.float().cpu().numpy(), detections.labels.cpu().numpy()
    results = []
    for i, (height, width) in enumerate(batch.original_sizes.tolist()):
        n = counts[i]
        rles = encode_masks(masks[i, :n], paste[i, :n], height, width, mask_threshold)
        results.append(ImageDetections(boxes[i, :n], scores[i, :n], labels[i, :n], rles))
    return results


def result_entries(
    detections: ImageDetections, image_id: int, file_name: str, categories: Sequence[Mapping[str, Any]], score_threshold: float
) -> list[dict[str, Any]]:
    """COCO results entries (bbox xywh, RLE segmentation, score) with the file and the category's id and name."""
    by_label = {int(c["id"]): c for c in categories}
    entries = []
    for box, score, label, rle in zip(
        detections.boxes_xyxy.tolist(), detections.scores.tolist(), detections.labels.tolist(), detections.rles
    ):
        if score < score_threshold:
            continue
        x1, y1, x2, y2 = box
        category = by_label[label]
        entries.append({
            "image_id": image_id, "file_name": file_name, "category_id": int(category["coco_id"]),
            "category_name": category["name"], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score, "segmentation": rle,
        })
    return entries


def image_files(folder: Path) -> list[Path]:
    """The JPEG and PNG files directly in `folder`, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_ids(files: Sequence[Path]) -> list[int]:
    """COCO-style ids: the file names' numbers when every name is one (000000397133.jpg), else 1..N by name."""
    stems = [p.stem for p in files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(files) + 1))
