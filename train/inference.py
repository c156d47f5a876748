"""A trained model on plain images: one import and one call.

    from train.inference import predict
    results = predict("runs/my/checkpoints/ckpt-00006000.pt", ["photo.jpg", pil_image, array])
    for r in results:
        print(r.names, r.scores, r.boxes)   # r.masks: [N, H, W] bool, in the image's own pixels

    detector = Detector("maskrcnn_resnet50_fpn_coco.pth", score_threshold=0.7)  # a model kept for many calls
    results = detector(images)

`Detector` reads the weights once (model/weights.py tells the kinds apart: a trainer checkpoint,
this model's state dict, torchvision's COCO Mask R-CNN), builds the model from the config the
weights imply (`config_for_weights`), and on each call batches the images by orientation,
resizes and pads them by the evaluation's own code (pipeline/images.py) and maps the detections
back to each image's pixels with the evaluator's code (`to_original_frame`), masks encoded as
COCO RLEs (`train.mask_encoding`). `ImageDetections` holds one image's detections with their
category ids and names; `result_entries` turns them into COCO results entries.
tools/predict.py and tools/export.py are built on these.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from pycocotools import mask as mask_utils
from torchvision.io import ImageReadMode, decode_image

from model.build import build_model_with_weights
from model.detections import Detections
from model.weights import WeightsError, WeightsFile, read_weights
from pipeline.batch import Batch
from pipeline.images import batch_from_images, orientation_batches
from pipeline.loader import settings_from_config
from train.config import REFERENCE_CONFIG, Config, load_config, load_saved_config
from train.distributed import pick_device
from train.evaluation import to_original_frame
from train.mask_encoding import encode_masks

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# What a Detector takes as one image: a file path, a PIL image, an array (H, W[, C]) or a uint8 tensor [3, H, W].
Image = Union[str, Path, np.ndarray, torch.Tensor, Any]


class ImageError(ValueError):
    """An image that cannot be read or used; the message names it and says why."""


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
    A file that does not decode is an ImageError of one sentence (torchvision's own message
    starts with the path of its C++ source).
    """
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=upright)
    except RuntimeError as e:
        raise ImageError(f"{path} does not decode as a JPEG or PNG image ({_decoder_problem(e)})") from None
    return TF.to_dtype(image, torch.uint8, scale=True)


def _decoder_problem(error: RuntimeError) -> str:
    """torchvision's decoder message without its C++ location ('decode_jpeg, .../decode_jpeg.cpp:171, ...')."""
    text = re.sub(r"^[\w()]+, \S+\.cpp:\d+, ", "", " ".join(str(error).split()))
    first = text.split(". ")[0].rstrip(".")
    return (first[:1].lower() + first[1:])[:120] or "unknown decoder error"


def as_image(image: Image, name: str = "image") -> torch.Tensor:
    """Any image a Detector takes -> uint8 RGB [3, H, W].

    Paths are read with `read_image` (EXIF orientation applied); PIL images are turned upright by
    their EXIF tag too and converted to RGB; arrays are RGB (H, W, 3), RGBA (alpha dropped) or
    grayscale (H, W), uint8 or uint16 (scaled to 8 bits); tensors are uint8 [3, H, W].
    """
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ImageError(f"{name} is a tensor of {image.dtype} {tuple(image.shape)}; pass uint8 RGB [3, H, W]")
        return image
    if hasattr(image, "getexif"):  # a PIL image
        from PIL import ImageOps

        upright = ImageOps.exif_transpose(image)
        array = np.asarray(upright)
        image = array if array.dtype == np.uint16 else np.asarray(upright.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name} is a {type(image).__name__}; pass a path, a PIL image, an array or a uint8 tensor")
    array = image[..., None] if image.ndim == 2 else image
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or array.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{name} is an array of {array.dtype} {image.shape}; pass uint8 or uint16 (H, W), (H, W, 3) or (H, W, 4)")
    pixels = torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
    pixels = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
    return TF.to_dtype(pixels.contiguous(), torch.uint8, scale=True)


@dataclass
class ImageDetections:
    """One image's detections in its own pixels, best first."""

    boxes: np.ndarray  # [N, 4] float32, xyxy
    scores: np.ndarray  # [N] float32
    labels: np.ndarray  # [N] int64, the model's classes 1..K
    category_ids: np.ndarray  # [N] int64, the categories' ids in their annotation file (COCO's for COCO)
    names: list[str]  # [N] category names
    rles: list[dict]  # N COCO RLEs of the whole image (pycocotools' format)

    @property
    def masks(self) -> np.ndarray:
        """[N, H, W] bool: each detection's mask in the image's pixels."""
        if not self.rles:
            return np.zeros((0, 0, 0), dtype=bool)
        return mask_utils.decode(self.rles).transpose(2, 0, 1).astype(bool)

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, score_threshold: float) -> "ImageDetections":
        """Only the detections scoring at least `score_threshold`."""
        keep = np.flatnonzero(self.scores >= score_threshold)
        return ImageDetections(
            self.boxes[keep], self.scores[keep], self.labels[keep], self.category_ids[keep],
            [self.names[i] for i in keep], [self.rles[i] for i in keep],
        )


def in_image_pixels(
    batch: Batch, detections: Detections, categories: Sequence[Mapping[str, Any]], mask_threshold: float = 0.5
) -> list[ImageDetections]:
    """The model's padded `detections` of `batch`, each image's mapped back to its own pixels."""
    counts = detections.num_detections.tolist()
    boxes, paste, masks = to_original_frame(batch, detections)
    boxes, paste, masks = boxes.cpu().numpy(), paste.cpu().numpy(), masks.cpu().numpy()
    scores, labels = detections.scores.float().cpu().numpy(), detections.labels.cpu().numpy()
    by_label = {int(c["id"]): c for c in categories}
    results = []
    for i, (height, width) in enumerate(batch.original_sizes.tolist()):
        n = counts[i]
        found = [by_label[int(label)] for label in labels[i, :n]]
        results.append(ImageDetections(
            boxes[i, :n], scores[i, :n], labels[i, :n].astype(np.int64),
            np.array([int(c["coco_id"]) for c in found], dtype=np.int64), [str(c["name"]) for c in found],
            encode_masks(masks[i, :n], paste[i, :n], height, width, mask_threshold),
        ))
    return results


@torch.inference_mode()
def detect(
    model: torch.nn.Module, batch: Batch, categories: Sequence[Mapping[str, Any]], mask_threshold: float = 0.5
) -> list[ImageDetections]:
    """`model` (in eval mode) on `batch`, each image's detections in its original pixels."""
    return in_image_pixels(batch, model(batch), categories, mask_threshold)


class Detector:
    """A trained Mask R-CNN for images: `Detector(weights)(images)` -> one `ImageDetections` per image.

    `weights`: a trainer checkpoint (its config and categories come with it), this model's state
    dict, or torchvision's COCO `maskrcnn_resnet50_fpn` file (COCO's names, its normalization and
    anchors). `config` / `overrides` change the model config as the tools' --config and KEY=VALUE
    do. `device`: auto (CUDA when there is one), cuda or cpu. Detections scoring below
    `score_threshold` are left out; `batch_size` images run per forward pass (default:
    eval.ims_per_batch). Errors a caller can fix are ValueErrors of one sentence (WeightsError,
    ConfigError, ImageError).
    """

    def __init__(
        self,
        weights: str | Path | WeightsFile,
        *,
        config: str | Path | None = None,
        overrides: Iterable[str] = (),
        device: str = "auto",
        score_threshold: float = 0.5,
        batch_size: int | None = None,
    ):
        self.weights = weights if isinstance(weights, WeightsFile) else read_weights(weights)
        self.config = config_for_weights(self.weights, config, overrides)
        categories = self.weights.class_categories()
        if not self.weights.has_heads or not categories:
            raise WeightsError(f"{self.weights} holds a backbone only; pass a trained detector (a checkpoint of train/main.py)")
        self.categories: list[dict[str, Any]] = categories
        self.device = pick_device(device, 0)
        self.model = build_model_with_weights(self.config.model, categories, self.weights, self.device)
        self.settings = settings_from_config(self.config.data, training=False)
        self.score_threshold = score_threshold
        self.batch_size = batch_size or self.config.eval.ims_per_batch

    def __call__(self, images: Image | Sequence[Image]) -> list[ImageDetections]:
        """Detections for each image, in the order given (one image: a list of one)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = [as_image(image, f"image {i}") for i, image in enumerate(images)]
        results: list[ImageDetections | None] = [None] * len(pixels)
        for indices in orientation_batches([tuple(p.shape[1:]) for p in pixels], self.batch_size):
            batch = batch_from_images([pixels[i] for i in indices], self.settings, self.device)
            for i, found in zip(indices, detect(self.model, batch, self.categories)):
                results[i] = found.above(self.score_threshold)
        return results


def predict(weights: str | Path, images: Image | Sequence[Image], **options: Any) -> list[ImageDetections]:
    """One call: `Detector(weights, **options)(images)`; keep a Detector to run many calls on one model."""
    return Detector(weights, **options)(images)


def result_entries(detections: ImageDetections, image_id: int, file_name: str) -> list[dict[str, Any]]:
    """COCO results entries (bbox xywh, RLE segmentation, score) with the file and the category's id and name."""
    entries = []
    for box, score, category_id, name, rle in zip(
        detections.boxes.tolist(), detections.scores.tolist(), detections.category_ids.tolist(), detections.names,
        detections.rles,
    ):
        x1, y1, x2, y2 = box
        entries.append({
            "image_id": image_id, "file_name": file_name, "category_id": category_id, "category_name": name,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score, "segmentation": rle,
        })
    return entries


def image_files(folder: Path) -> list[Path]:
    """The JPEG and PNG files directly in `folder`, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# Ids made from names lie below 2**52, so that JSON readers that hold numbers as doubles keep them exact.
NAME_ID_BITS = 52


def image_id(file_name: str) -> int:
    """A COCO-style image id that depends on the file's own name only, so adding files never renumbers others.

    A name that is a number (000000397133.jpg) gives that number, as COCO's files do; any other
    name a number from its SHA-256 (the first 52 bits).
    """
    stem = Path(file_name).stem
    if stem.isdigit():
        return int(stem)
    return int(hashlib.sha256(file_name.encode()).hexdigest(), 16) >> (256 - NAME_ID_BITS)


def image_ids(files: Sequence[Path]) -> list[int]:
    """`image_id` of each file; two files with one id (7.jpg and 007.png) are an ImageError naming both."""
    ids = [image_id(p.name) for p in files]
    first: dict[int, Path] = {}
    for path, number in zip(files, ids):
        if number in first:
            raise ImageError(
                f"{first[number].name} and {path.name} both get image_id {number} (from their names); "
                "rename one of them"
            )
        first[number] = path
    return ids
