"""A synthetic COCO as large as train2017, written in minutes: for rehearsing the data path at full scale.

The sharder, the verifier and the loaders' start-up (manifest, indices, epoch plan) cost what
the number of images, annotations and polygon vertices makes them cost, so those follow COCO
train2017 (`instances_train2017.json`, 448 MB):

- 118,287 images with sparse 12-digit ids; 1,021 of them (0.86%) without any annotation, so
  that the reference's filter keeps 117,266 images, as it does of train2017;
- sizes: 95% with a long side of 640 and a short side of 480 or 427 (a third each) or
  anywhere in 333..640, the others 500 on the long side; a quarter portrait; 2% grayscale;
- objects per image geometric with mean 7.3 (COCO: 7.3), at most 93, one image with 93:
  about 860,000 annotations, 1% of them crowd regions (uncompressed RLE, as COCO stores them);
- categories: COCO's 80 ids and names, `person` holding 30% of the objects (COCO: 30.5%),
  the others equally likely;
- object sides log-uniform over 4..500 pixels, placed inside the image (by COCO's area ranges
  on the boxes about 42% small, 38% medium, 19% large; COCO: 41/34/24); each a star-shaped
  polygon of 8..40 vertices, 15% in two parts (about 27 vertices an object), coordinates with
  2 decimals as COCO's; `bbox` is the polygons' extent and `area` their shoelace area
  (nothing in the data path reads it). The annotation file weighs about 505 MB.

What is cheap: the pixels. Each distinct size has one JPEG (smooth noise, about 25 KB at
640x480; COCO's average 160 KB), and every image of that size is a hard link to it, so the image folder costs
no disk while the sharder still reads and fully decodes every file. The JSON is written image
by image and never held whole. The same arguments always produce the same files.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from pipeline.coco_categories import COCO_CATEGORIES
from pipeline.synthetic_coco import synthetic_categories

TRAIN2017_IMAGES = 118_287
EMPTY_FRACTION = 1_021 / 118_287  # train2017's images without annotations
MEAN_OBJECTS = 7.3
MAX_OBJECTS = 93
CROWD_FRACTION = 0.01
PERSON_SHARE = 0.30
PORTRAIT_FRACTION = 0.25
GRAYSCALE_FRACTION = 0.02
MULTIPART_FRACTION = 0.15
SIDE_RANGE = (4.0, 500.0)  # pixels, log-uniform
VERTEX_RANGE = (8, 40)
JPEG_QUALITY = 75


def make_scale_coco(out_dir: Path, split: str = "train", num_images: int = TRAIN2017_IMAGES, *, seed: int = 0) -> dict[str, Any]:
    """Write `out_dir/instances_<split>.json`, `out_dir/<split>2017/` (hard links) and their templates.

    Returns counts: images, annotations, crowd annotations, polygon vertices, distinct sizes, bytes of the JSON.
    """
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2, got {num_images}")
    rng = np.random.default_rng([seed, 25])
    out_dir = Path(out_dir)
    image_dir, template_dir = out_dir / f"{split}2017", out_dir / "templates"
    image_dir.mkdir(parents=True, exist_ok=True)
    template_dir.mkdir(parents=True, exist_ok=True)

    image_ids = np.sort(rng.choice(np.arange(1, 600_000), num_images, replace=False))
    heights, widths = _image_sizes(rng, num_images)
    gray = rng.random(num_images) < GRAYSCALE_FRACTION
    counts = np.minimum(rng.geometric(1.0 / MEAN_OBJECTS, num_images), MAX_OBJECTS)
    order = rng.permutation(num_images)
    counts[order[: max(int(round(EMPTY_FRACTION * num_images)), 1)]] = 0
    counts[order[-1]] = MAX_OBJECTS

    templates: dict[tuple[int, int, bool], Path] = {}
    for image_id, height, width, is_gray in zip(image_ids.tolist(), heights.tolist(), widths.tolist(), gray.tolist()):
        key = (height, width, is_gray)
        if key not in templates:
            templates[key] = template_dir / f"{height}x{width}{'-gray' if is_gray else ''}.jpg"
            templates[key].write_bytes(_template_jpeg(rng, height, width, is_gray))
        target = image_dir / f"{image_id:012d}.jpg"
        target.unlink(missing_ok=True)
        os.link(templates[key], target)

    categories = synthetic_categories(len(COCO_CATEGORIES))
    stats = {"images": num_images, "annotations": 0, "crowd": 0, "vertices": 0, "sizes": len(templates)}
    json_path = out_dir / f"instances_{split}.json"
    with open(json_path, "w") as f:
        f.write('{"info": ' + json.dumps({"description": f"COCO-scale synthetic set, split {split}, seed {seed}"}))
        f.write(', "licenses": [{"id": 1, "name": "CC0", "url": ""}], "categories": ' + json.dumps(categories))
        images = [
            {"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w, "license": 1}
            for i, h, w in zip(image_ids.tolist(), heights.tolist(), widths.tolist())
        ]
        f.write(', "images": ' + json.dumps(images) + ', "annotations": [')
        separator = ""
        for index in range(num_images):
            objects = list(_objects(rng, int(counts[index]), int(heights[index]), int(widths[index]), categories))
            for annotation in objects:
                stats["annotations"] += 1
                stats["crowd"] += annotation["iscrowd"]
                stats["vertices"] += sum(len(p) // 2 for p in annotation["segmentation"]) if not annotation["iscrowd"] else 0
                annotation.update(id=stats["annotations"], image_id=int(image_ids[index]))
            if objects:
                f.write(separator + ", ".join(json.dumps(a) for a in objects))
                separator = ", "
        f.write("]}")
    stats["json_bytes"] = json_path.stat().st_size
    return stats


def _image_sizes(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths): long side 640 (or 500 for 5%), short side 480, 427 or 333..640 (a third each)."""
    long_side = np.where(rng.random(count) < 0.95, 640, 500)
    kind = rng.integers(3, size=count)
    short_side = np.select([kind == 0, kind == 1], [480, 427], rng.integers(333, 641, size=count))
    short_side = np.minimum(short_side * long_side // 640, long_side)
    portrait = rng.random(count) < PORTRAIT_FRACTION
    return np.where(portrait, long_side, short_side), np.where(portrait, short_side, long_side)


def _template_jpeg(rng: np.random.Generator, height: int, width: int, gray: bool) -> bytes:
    """Smooth colour noise: a small random field scaled up, about 20 KB as a 640x480 JPEG."""
    field = rng.integers(0, 256, size=(max(height // 32, 2), max(width // 32, 2), 1 if gray else 3), dtype=np.uint8)
    image = Image.fromarray(field[..., 0] if gray else field).resize((width, height), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _objects(rng: np.random.Generator, count: int, height: int, width: int, categories: list[dict]) -> Iterator[dict]:
    """`count` annotations (without ids) of one image."""
    sides = np.exp(rng.uniform(np.log(SIDE_RANGE[0]), np.log(SIDE_RANGE[1]), (count, 2)))
    sides = np.minimum(sides, [width - 1, height - 1])
    x0 = rng.uniform(0, width - sides[:, 0])
    y0 = rng.uniform(0, height - sides[:, 1])
    person = rng.random(count) < PERSON_SHARE
    labels = np.where(person, 0, rng.integers(1, len(categories), count))
    crowd = rng.random(count) < CROWD_FRACTION
    parts = np.where(rng.random(count) < MULTIPART_FRACTION, 2, 1)
    for k in range(count):
        box = (float(x0[k]), float(y0[k]), float(sides[k, 0]), float(sides[k, 1]))
        category_id = categories[int(labels[k])]["id"]
        yield _crowd(box, height, width, category_id) if crowd[k] else _polygons(rng, box, int(parts[k]), category_id)


def _polygons(rng: np.random.Generator, box: tuple[float, float, float, float], parts: int, category_id: int) -> dict:
    x, y, w, h = box
    polygons, area = [], 0.0
    part_w = w / parts
    for part in range(parts):
        vertices = int(rng.integers(VERTEX_RANGE[0], VERTEX_RANGE[1] + 1))
        angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
        radii = rng.uniform(0.6, 1.0, vertices)
        px = x + part_w * (part + 0.5 + 0.5 * radii * np.cos(angles))
        py = y + h * (0.5 + 0.5 * radii * np.sin(angles))
        polygon = np.round(np.stack([px, py], axis=1), 2)
        area += 0.5 * abs(float(np.dot(polygon[:, 0], np.roll(polygon[:, 1], 1)) - np.dot(polygon[:, 1], np.roll(polygon[:, 0], 1))))
        polygons.append(polygon.ravel().tolist())
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    return {
        "category_id": category_id, "segmentation": polygons, "area": round(area, 2),
        "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)], "iscrowd": 0,
    }


def _crowd(box: tuple[float, float, float, float], height: int, width: int, category_id: int) -> dict:
    """A crowd region: the integer box as an uncompressed, column-major RLE (zeros first), as COCO stores crowds."""
    x0, y0 = int(box[0]), int(box[1])
    x1, y1 = min(int(box[0] + box[2]) + 1, width), min(int(box[1] + box[3]) + 1, height)
    rows = y1 - y0
    counts = [x0 * height + y0]
    for _ in range(x0, x1 - 1):
        counts += [rows, height - rows]
    counts += [rows, height * width - counts[0] - (x1 - x0) * rows - (x1 - x0 - 1) * (height - rows)]
    return {
        "category_id": category_id, "segmentation": {"counts": counts, "size": [height, width]},
        "area": float((x1 - x0) * rows), "bbox": [float(x0), float(y0), float(x1 - x0), float(rows)], "iscrowd": 1,
    }
