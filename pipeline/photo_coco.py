"""A COCO-like set of real photographs, for benchmarks of the input pipeline.

Real photographs compress and decode unlike drawn scenes (their JPEG bytes and entropy decoding
cost depend on natural texture), so pipeline figures are measured on these. The pixels come
from the photographs scikit-image ships (`skimage.data`: astronaut, cat, coffee, rocket, the
two motorcycle views, and the grayscale camera man), each image a random crop of one of them,
scaled to a COCO size and sometimes mirrored, with a small exposure change:

- sizes as COCO's: 640 wide and 426..512 high, a quarter of them portrait (the transpose);
- JPEGs at quality 94 by default: 85 KiB on average (5-95%: about 45-125 KiB), as the
  87 KiB of the COCO-like set the pipeline's goals were set on;
- about 2% grayscale (single-channel) JPEGs, as in COCO;
- the 80 COCO categories with their sparse ids, and per image a COCO-like number of
  instances (geometric, mean about 7), one image with `max_instances` of them, so the manifest's
  maxima are COCO's order of magnitude (93 instances) while most batches need far fewer;
- instances as polygons (convex, concave, a few multi-part), sizes spread over COCO's small,
  medium and large ranges; `bbox` is their extent and `area` their pycocotools mask area.

The annotations do not follow the photographs' content: the set measures speed, not accuracy.
The same arguments always produce the same bytes.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.coco_categories import COCO_CATEGORIES
from pipeline.synthetic_coco import object_polygons, polygon_annotation, synthetic_categories, write_instances_json

WIDTH = 640
HEIGHTS = (426, 512)  # inclusive range of the short side, as COCO's 640x426 .. 640x512
PORTRAIT_FRACTION = 0.25
GRAYSCALE_FRACTION = 0.02
MEAN_INSTANCES = 7.0  # COCO train2017: about 7.3 non-crowd instances per image
COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle:0", "stereo_motorcycle:1")
GRAY_PHOTO = "camera"


def photo_sources() -> dict[str, np.ndarray]:
    """The shipped photographs by name: uint8 [h, w, 3] colour ones and the [h, w] grayscale one."""
    try:
        from skimage import data
    except ImportError:
        raise ValueError("the photo set needs scikit-image: pip install -e '.[dev]' (or pip install scikit-image)") from None
    sources = {}
    for name in (*COLOR_PHOTOS, GRAY_PHOTO):
        loader, _, part = name.partition(":")
        pixels = getattr(data, loader)()
        sources[name] = pixels[int(part)] if part else pixels
    return sources


def make_photo_coco(
    out_dir: Path,
    split: str = "train",
    num_images: int = 400,
    *,
    seed: int = 0,
    jpeg_quality: int = 94,
    max_instances: int = 93,
) -> Path:
    """Write the photo set's split under `out_dir` (as pipeline/synthetic_coco.py's layout); returns its JSON path."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if not 1 <= jpeg_quality <= 95:
        raise ValueError(f"jpeg_quality must be within 1..95, got {jpeg_quality}")
    if max_instances < 1:
        raise ValueError(f"max_instances must be at least 1, got {max_instances}")
    sources = photo_sources()
    out_dir = Path(out_dir)
    image_dir = out_dir / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = synthetic_categories(len(COCO_CATEGORIES))

    split_rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 1])
    image_ids = sorted(int(i) for i in split_rng.choice(np.arange(1, 600_000), num_images, replace=False))
    crowded = int(split_rng.integers(num_images))  # the image with `max_instances` instances
    gray = set(split_rng.permutation(num_images)[: int(round(GRAYSCALE_FRACTION * num_images))].tolist())

    images, annotations = [], []
    for index, image_id in enumerate(image_ids):
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 1, index])
        source = sources[GRAY_PHOTO] if index in gray else sources[COLOR_PHOTOS[rng.integers(len(COLOR_PHOTOS))]]
        height, width = _coco_size(rng)
        pixels = _photo_crop(rng, source, height, width)
        file_name = f"{image_id:012d}.jpg"
        (image_dir / file_name).write_bytes(_jpeg(pixels, jpeg_quality))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width, "license": 1})
        count = max_instances if index == crowded else min(int(rng.geometric(1.0 / MEAN_INSTANCES)), max_instances)
        for _ in range(count):
            instance = _instance(rng, height, width, categories)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **instance})
    description = f"COCO-like photographs (scikit-image's sample photos), split {split}, seed {seed}"
    return write_instances_json(out_dir, split, description, images, annotations, categories)


def _coco_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1))
    return (WIDTH, short) if rng.random() < PORTRAIT_FRACTION else (short, WIDTH)


def _photo_crop(rng: np.random.Generator, source: np.ndarray, height: int, width: int) -> Image.Image:
    """A crop of `source` with the target's aspect ratio (60-100% of the largest), scaled to it,
    mirrored half the time, with an exposure change of up to 15%."""
    image = Image.fromarray(source)
    src_h, src_w = source.shape[:2]
    crop_w = min(src_w, src_h * width / height) * rng.uniform(0.6, 1.0)
    crop_h = crop_w * height / width
    x0, y0 = rng.uniform(0, src_w - crop_w), rng.uniform(0, src_h - crop_h)
    image = image.resize((width, height), Image.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.85, 1.15)
    return image.point(lambda v: min(255, int(v * gain + 0.5)))


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _instance(rng: np.random.Generator, height: int, width: int, categories: list[dict[str, Any]]) -> dict[str, Any]:
    """One object: polygons inside the image, sized log-uniformly from a few pixels to most of it."""
    short = min(height, width)
    box_w, box_h = short * np.exp(rng.uniform(np.log(0.02), np.log(0.8), size=2))
    x0, y0 = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
    polygons = object_polygons(rng, x0, y0, box_w, box_h, multipart_prob=0.15)
    return polygon_annotation(polygons, height, width, categories[int(rng.integers(len(categories)))]["id"])
