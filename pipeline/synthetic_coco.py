"""Synthetic COCO-format data sets for the demo, the tests and warm-up.

`make_synthetic_coco` writes `instances_<split>.json` and `<split>2017/<12-digit id>.jpg`,
deterministic for a seed, shaped like COCO to the code that reads it:

- sparse COCO category ids and names (spread over the real 80 categories, so never 1..N);
- mostly landscape images with some portrait ones, sizes varying like COCO's;
- a textured background (low-frequency colour field, grey clutter, sensor noise), so a
  640x480 JPEG weighs about as much as a COCO one;
- objects as polygons: convex, concave (stars) and multi-part ones, plus a few tiny ones;
- crowd regions stored as RLE (`iscrowd: 1`), one image with crowd only, images with no
  annotation, and grayscale JPEGs.

Each class is drawn with its own saturated colour and stripe/dot pattern, so a detector
can learn the classes within minutes on a CPU. Objects never overlap, and an object's
pixels are exactly its annotated polygons as rasterized by PIL's `ImageDraw.polygon`;
`bbox` is the polygons' extent and `area` the pycocotools area of their mask, as in COCO.
"""

from __future__ import annotations

import colorsys
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from pipeline.coco_categories import COCO_CATEGORIES

# Pattern name -> which pixels (x, y) take the darker shade, for a stripe period p.
PATTERNS = {
    "horizontal": lambda x, y, p: (y % p) < p // 2,
    "vertical": lambda x, y, p: (x % p) < p // 2,
    "diagonal": lambda x, y, p: ((x + y) % p) < p // 2,
    "antidiagonal": lambda x, y, p: ((x - y) % p) < p // 2,
    "dots": lambda x, y, p: ((x % p) < 2) & ((y % p) < 2),
    "checker": lambda x, y, p: ((x // (p // 2) + y // (p // 2)) % 2) == 0,
}
PATTERN_NAMES = tuple(PATTERNS)
PORTRAIT_FRACTION = 0.25
MASK_FORMATS = ("polygons", "rle", "rle-list")  # how instance masks are written (`rle_segmentation`)
MAX_SIDE = 8192  # 8192^2 pixels stay under PIL's decompression-bomb limit, which the sharder applies
TINY_FRACTION = 0.1  # share of ordinary objects drawn a few pixels wide


@dataclass(frozen=True)
class SyntheticOptions:
    """Everything that shapes a synthetic set besides its split, size and seed."""

    image_size: tuple[int, int] = (480, 640)  # (height, width) of a landscape image
    num_classes: int = 8
    max_objects: int = 6
    grayscale_fraction: float = 0.1
    empty_fraction: float = 0.1
    crowd_fraction: float = 0.15
    jpeg_quality: int = 90
    masks: str = "polygons"  # how non-crowd instance masks are written: one of MASK_FORMATS


def make_synthetic_coco(
    out_dir: Path,
    split: str = "train",
    num_images: int = 16,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (480, 640),
    num_classes: int = 8,
    max_objects: int = 6,
    grayscale_fraction: float = 0.1,
    empty_fraction: float = 0.1,
    crowd_fraction: float = 0.15,
    jpeg_quality: int = 90,
    masks: str = "polygons",
) -> Path:
    """Write a synthetic COCO split under `out_dir`; returns the path of `instances_<split>.json`.

    Fractions are shares of `num_images`, rounded up whenever non-zero, so a small set still
    holds at least one grayscale, one empty and one crowd image. The same arguments always
    produce the same bytes; different splits get different image ids. `masks` "rle" or
    "rle-list" writes each non-crowd instance as the RLE of its polygons' pycocotools mask, as
    labeling tools export brush masks (`rle_segmentation`); the images are the same.
    """
    options = SyntheticOptions(
        image_size=tuple(image_size),
        num_classes=num_classes,
        max_objects=max_objects,
        grayscale_fraction=grayscale_fraction,
        empty_fraction=empty_fraction,
        crowd_fraction=crowd_fraction,
        jpeg_quality=jpeg_quality,
        masks=masks,
    )
    _check_options(num_images, options)
    out_dir = Path(out_dir)
    image_dir = out_dir / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)

    categories = synthetic_categories(num_classes)
    split_rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    image_ids = sorted(int(i) for i in split_rng.choice(np.arange(1, 600_000), num_images, replace=False))
    roles = _assign_roles(split_rng, num_images, options)

    images, annotations = [], []
    for index, image_id in enumerate(image_ids):
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
        scene = _draw_scene(rng, roles[index], categories, options)
        file_name = f"{image_id:012d}.jpg"
        pixels = scene.image.convert("L") if "grayscale" in roles[index] else scene.image
        pixels.save(image_dir / file_name, format="JPEG", quality=options.jpeg_quality)
        images.append(
            {"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width, "license": 1}
        )
        for instance in scene.instances:
            if options.masks != "polygons" and not instance["iscrowd"]:
                segmentation = rle_segmentation(instance["segmentation"], scene.height, scene.width, options.masks)
                instance = {**instance, "segmentation": segmentation}
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **instance})

    return write_instances_json(
        out_dir, split, f"synthetic COCO-format set, split {split}, seed {seed}", images, annotations, categories
    )


def rle_segmentation(polygons: list[list[float]], height: int, width: int, form: str) -> dict[str, Any]:
    """The RLE of `polygons`' pycocotools mask: `rle` pycocotools' compressed string, `rle-list` the
    uncompressed column-major run lengths (starting with background) that tools such as pycococreator
    and CVAT write."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if form == "rle":
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    flat = mask_utils.decode(rle).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]]))
    return {"size": [height, width], "counts": ([0] if flat[0] else []) + counts.tolist()}


def write_instances_json(
    out_dir: Path,
    split: str,
    description: str,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]],
) -> Path:
    """Write `out_dir/instances_<split>.json` in COCO's layout; returns its path."""
    dataset = {
        "info": {"description": description, "version": "1.0"},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    json_path = Path(out_dir) / f"instances_{split}.json"
    json_path.write_text(json.dumps(dataset))
    return json_path


def synthetic_categories(num_classes: int) -> list[dict[str, Any]]:
    """`num_classes` real COCO categories spread evenly over the 80, so their ids are sparse."""
    picks = np.linspace(0, len(COCO_CATEGORIES) - 1, num_classes).round().astype(int)
    return [
        {"id": COCO_CATEGORIES[i][0], "name": COCO_CATEGORIES[i][1], "supercategory": COCO_CATEGORIES[i][2]}
        for i in picks
    ]


def _check_options(num_images: int, options: SyntheticOptions) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if not 1 <= options.num_classes <= len(COCO_CATEGORIES):
        raise ValueError(f"num_classes must be within 1..{len(COCO_CATEGORIES)}, got {options.num_classes}")
    if min(options.image_size) < 32 or max(options.image_size) > MAX_SIDE:
        raise ValueError(
            f"image_size must be within 32..{MAX_SIDE} on each side, got {tuple(options.image_size)} "
            "(larger images exceed what the sharder decodes safely)"
        )
    if options.max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {options.max_objects}")
    for name in ("grayscale_fraction", "empty_fraction", "crowd_fraction"):
        if not 0.0 <= getattr(options, name) <= 1.0:
            raise ValueError(f"{name} must be within 0..1, got {getattr(options, name)}")
    if options.empty_fraction + options.crowd_fraction > 1.0:
        raise ValueError("empty_fraction + crowd_fraction must not exceed 1")
    if options.masks not in MASK_FORMATS:
        raise ValueError(f"masks must be one of {', '.join(MASK_FORMATS)}, got {options.masks!r}")


def _share(fraction: float, total: int) -> int:
    return min(total, math.ceil(fraction * total)) if fraction > 0 else 0


def _assign_roles(rng: np.random.Generator, num_images: int, options: SyntheticOptions) -> list[set[str]]:
    """Per image, the special cases it shows: `empty`, `crowd`, `crowd_only`, `grayscale`, `portrait`."""
    roles: list[set[str]] = [set() for _ in range(num_images)]
    order = rng.permutation(num_images)
    num_empty = _share(options.empty_fraction, num_images)
    num_crowd = min(_share(options.crowd_fraction, num_images), num_images - num_empty)
    for rank, index in enumerate(order):
        if rank < num_empty:
            roles[index].add("empty")
        elif rank < num_empty + num_crowd:
            roles[index].add("crowd")
            if rank == num_empty and num_crowd > 1:
                roles[index].add("crowd_only")  # COCO has these: kept by the filter, no boxes left
    for index in rng.permutation(num_images)[: _share(options.grayscale_fraction, num_images)]:
        roles[index].add("grayscale")
    for index in rng.permutation(num_images)[: _share(PORTRAIT_FRACTION, num_images)]:
        roles[index].add("portrait")
    return roles


@dataclass
class _Scene:
    image: Image.Image
    height: int
    width: int
    instances: list[dict[str, Any]] = field(default_factory=list)
    occupied: list[tuple[float, float, float, float]] = field(default_factory=list)


def _draw_scene(
    rng: np.random.Generator, roles: set[str], categories: list[dict[str, Any]], options: SyntheticOptions
) -> _Scene:
    short, long = sorted(options.image_size)
    short = int(round(short * rng.uniform(0.8, 1.0)))  # COCO sizes vary: 640x480, 640x427, ...
    height, width = (long, short) if "portrait" in roles else (short, long)
    scene = _Scene(image=_background(rng, height, width), height=height, width=width)
    if "crowd" in roles:
        _add_crowd(rng, scene, categories, options)
    if "empty" not in roles and "crowd_only" not in roles:
        for _ in range(rng.integers(1, options.max_objects + 1)):
            _add_object(rng, scene, categories, options)
    _add_sensor_noise(rng, scene)
    return scene


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A muted low-frequency colour field with grey clutter: texture that is not any class."""
    coarse = rng.uniform(70, 190, size=(4, 5, 3)).astype(np.uint8)
    colour_field = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    grey = np.asarray(colour_field.convert("L"), dtype=np.float32)[..., None]
    muted = 0.5 * np.asarray(colour_field, dtype=np.float32) + 0.5 * grey  # desaturate: classes own the colours
    image = Image.fromarray(muted.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 10)):
        x0, x1 = sorted(rng.uniform(0, width, 2))
        y0, y1 = sorted(rng.uniform(0, height, 2))
        shade = int(rng.integers(60, 200))
        draw.ellipse((x0, y0, x1, y1), outline=(shade,) * 3, width=int(rng.integers(1, 4)))
    return image


def _add_sensor_noise(rng: np.random.Generator, scene: _Scene) -> None:
    # Per-pixel noise is what gives real photos their JPEG weight (100-200 KB at 640x480).
    pixels = np.asarray(scene.image, dtype=np.int16)
    pixels = pixels + rng.normal(0, 15, size=pixels.shape).astype(np.int16)
    scene.image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def class_texture(class_index: int, num_classes: int, box: tuple[int, int, int, int]) -> Image.Image:
    """The fill of class `class_index` over `box` (left, top, right, bottom): its own hue with a
    class-specific stripe or dot pattern, aligned to image coordinates."""
    hue = class_index / num_classes
    base = np.array(colorsys.hsv_to_rgb(hue, 0.9, 0.95)) * 255
    period = 4 + 2 * ((class_index // len(PATTERNS)) % 3)
    left, top, right, bottom = box
    y, x = np.mgrid[top:bottom, left:right]
    on = PATTERNS[PATTERN_NAMES[class_index % len(PATTERN_NAMES)]](x, y, period)
    pixels = np.where(on[..., None], base * 0.4, base)
    return Image.fromarray(pixels.astype(np.uint8))


def _place(
    rng: np.random.Generator, scene: _Scene, box_w: float, box_h: float
) -> tuple[float, float] | None:
    """Top-left corner of a free box of the given size, or None; objects never overlap."""
    for _ in range(20):
        x0 = rng.uniform(0, scene.width - box_w)
        y0 = rng.uniform(0, scene.height - box_h)
        box = (x0 - 1, y0 - 1, x0 + box_w + 1, y0 + box_h + 1)
        if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in scene.occupied):
            scene.occupied.append(box)
            return x0, y0
    return None


def polygon_shape(rng: np.random.Generator, kind: str, cx: float, cy: float, rx: float, ry: float) -> list[float]:
    """A polygon as COCO's flat [x0, y0, x1, y1, ...] list, vertices rounded to 2 decimals."""
    if kind == "rectangle":
        points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "star":  # concave: radii alternate between outer and inner
        tips = int(rng.integers(5, 8))
        inner = rng.uniform(0.35, 0.6)
        angles = np.arange(2 * tips) * math.pi / tips + rng.uniform(0, math.pi)
        radii = np.where(np.arange(2 * tips) % 2 == 0, 1.0, inner)
        points = list(zip(radii * np.cos(angles), radii * np.sin(angles)))
    else:  # ellipse: convex
        angles = np.linspace(0, 2 * math.pi, int(rng.integers(10, 20)), endpoint=False)
        points = list(zip(np.cos(angles), np.sin(angles)))
    return [round(float(v), 2) for px, py in points for v in (cx + px * rx, cy + py * ry)]


def _rasterize(polygons: list[list[float]], height: int, width: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in polygons:
        draw.polygon(polygon, fill=255)
    return mask


def _paint(scene: _Scene, mask: Image.Image, class_index: int, num_classes: int) -> None:
    box = mask.getbbox()
    if box is None:  # a polygon too thin to cover a pixel
        return
    texture = class_texture(class_index, num_classes, box)
    scene.image.paste(Image.composite(texture, scene.image.crop(box), mask.crop(box)), box)


def _add_object(
    rng: np.random.Generator, scene: _Scene, categories: list[dict[str, Any]], options: SyntheticOptions
) -> None:
    short = min(scene.height, scene.width)
    if rng.random() < TINY_FRACTION:
        box_w, box_h = rng.uniform(3, 8, size=2)
    else:
        box_w, box_h = rng.uniform(0.15, 0.45, size=2) * short
    corner = _place(rng, scene, box_w, box_h)
    if corner is None:
        return
    x0, y0 = corner
    polygons = object_polygons(rng, x0, y0, box_w, box_h, multipart_prob=0.25)
    class_index = int(rng.integers(options.num_classes))
    _paint(scene, _rasterize(polygons, scene.height, scene.width), class_index, options.num_classes)
    scene.instances.append(polygon_annotation(polygons, scene.height, scene.width, categories[class_index]["id"]))


def object_polygons(
    rng: np.random.Generator, x0: float, y0: float, box_w: float, box_h: float, multipart_prob: float
) -> list[list[float]]:
    """One object's polygons filling the box at (x0, y0): a rectangle, star or ellipse, sometimes
    (boxes over 24 pixels wide, with `multipart_prob`) two pieces side by side."""
    kind = str(rng.choice(["rectangle", "star", "ellipse"]))
    if box_w > 24 and rng.random() < multipart_prob:
        half = box_w / 2
        return [
            polygon_shape(rng, kind, x0 + half * 0.45, y0 + box_h / 2, half * 0.42, box_h / 2),
            polygon_shape(rng, kind, x0 + half * 1.55, y0 + box_h / 2, half * 0.42, box_h / 2),
        ]
    return [polygon_shape(rng, kind, x0 + box_w / 2, y0 + box_h / 2, box_w / 2, box_h / 2)]


def polygon_annotation(polygons: list[list[float]], height: int, width: int, category_id: int) -> dict[str, Any]:
    """A non-crowd COCO annotation (without ids): `bbox` the polygons' extent, `area` their mask's pixels."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    return {
        "category_id": category_id,
        "segmentation": polygons,
        "area": float(mask_utils.area(rle)),
        "bbox": [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
        "iscrowd": 0,
    }


def _add_crowd(
    rng: np.random.Generator, scene: _Scene, categories: list[dict[str, Any]], options: SyntheticOptions
) -> None:
    """A crowd: many small same-class blobs in one region, annotated once as an RLE mask."""
    short = min(scene.height, scene.width)
    box_w, box_h = rng.uniform(0.3, 0.5, size=2) * short
    corner = _place(rng, scene, box_w, box_h)
    if corner is None:
        return
    x0, y0 = corner
    radius = max(2.0, short / 40)
    blobs = [
        polygon_shape(rng, "ellipse", x0 + rng.uniform(radius, box_w - radius), y0 + rng.uniform(radius, box_h - radius),
               radius, radius)
        for _ in range(int(rng.integers(8, 16)))
    ]
    mask = _rasterize(blobs, scene.height, scene.width)
    class_index = int(rng.integers(options.num_classes))
    _paint(scene, mask, class_index, options.num_classes)

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) > 0, dtype=np.uint8))
    scene.instances.append(
        {
            "category_id": categories[class_index]["id"],
            "segmentation": {"size": [scene.height, scene.width], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 1,
        }
    )
