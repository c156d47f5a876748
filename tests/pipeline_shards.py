"""Small shard sets with objects drawn from known polygons, for the pipeline tests.

Objects are flat white polygons on a black background, so an image's object pixels are known
exactly from its polygons, and each box is the extent of its instance's polygons.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.shard_format import GROUPS, Sample, shard_name, write_manifest, write_shard
from train.config import load_config

REFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"


# The manifest categories of drawn samples, whose labels are 1..3.
DRAWN_CATEGORIES = [{"id": i, "coco_id": i, "name": f"class {i}"} for i in (1, 2, 3)]


def data_config(*overrides: str):
    """The reference `data` section with small sizes and one worker thread, plus `overrides`."""
    base = ["data.min_size=96", "data.max_size=160", "data.dali_threads=1", "data.torch_workers=1", "data.shuffle_buffer=8"]
    return load_config(REFERENCE_CONFIG, [*base, *overrides]).data


def asymmetric_instances(height: int, width: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """One to three instances left of centre (so a flip moves them), one with two parts."""
    instances = []
    for i in range(rng.integers(1, 4)):
        x0 = rng.uniform(2, width * 0.15)
        y0 = rng.uniform(2, height * 0.5)
        w, h = rng.uniform(width * 0.2, width * 0.3), rng.uniform(height * 0.25, height * 0.4)
        # A right triangle with its right angle bottom-left: not mirror-symmetric.
        parts = [np.array([[x0, y0], [x0, y0 + h], [x0 + w, y0 + h]], np.float32)]
        if i == 0:
            parts.append(np.array([[x0 + w + 2, y0], [x0 + w + 12, y0], [x0 + w + 12, y0 + 10]], np.float32))
        instances.append(parts)
    return instances


def drawn_sample(image_id: int, height: int, width: int, instances: list[list[np.ndarray]]) -> Sample:
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    boxes, polys, verts = [], [], []
    for index, parts in enumerate(instances):
        for part in parts:
            draw.polygon([tuple(p) for p in part], fill=(255, 255, 255))
            polys.append((index, len(verts), len(verts) + len(part)))
            verts.extend(part.tolist())
        points = np.concatenate(parts)
        boxes.append([*points.min(0), *points.max(0)])
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=95)
    return Sample(
        image_id=image_id,
        file_name=f"{image_id:012d}.jpg",
        height=height,
        width=width,
        jpeg=jpeg.getvalue(),
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        labels=(np.arange(len(instances), dtype=np.int32) % 3) + 1,
        polys=np.array(polys, np.int32).reshape(-1, 3),
        verts=np.array(verts, np.float32).reshape(-1, 2),
    )


def write_drawn_shards(
    folder: Path, sizes: list[tuple[int, int]], samples_per_shard: int = 3, seed: int = 0
) -> list[Sample]:
    """One drawn image per (height, width) in `sizes`, image ids 1..n; returns the samples."""
    rng = np.random.default_rng(seed)
    samples = [drawn_sample(i + 1, h, w, asymmetric_instances(h, w, rng)) for i, (h, w) in enumerate(sizes)]
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for group in GROUPS:
        members = [s for s in samples if s.group == group]
        for start in range(0, len(members), samples_per_shard):
            path = folder / shard_name("train", group, start // samples_per_shard)
            entries.append(write_shard(path, members[start : start + samples_per_shard]))
    write_manifest(
        folder,
        {
            "split": "train",
            "shards": entries,
            "samples": len(samples),
            "max_instances": max(len(s.labels) for s in samples),
            "max_polygons": max(len(s.polys) for s in samples),
            "max_vertices": max(len(s.verts) for s in samples),
            "categories": DRAWN_CATEGORIES,
        },
    )
    return samples
