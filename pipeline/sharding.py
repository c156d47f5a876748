"""COCO instances JSON + JPEG folder -> WebDataset shards (the write side of pipeline/shard_format.py).

`shard_coco` validates the input, applies the reference's data rules, maps categories to
contiguous ids, shuffles with a seed, groups by orientation, and writes shards in parallel
worker processes (one shard per task, so the output does not depend on the worker count).
`verify_shards` checks a finished folder against its manifest.

Reference rules (maskrcnn-benchmark's COCODataset, which the MLPerf reference trains on):
- `--mode train` keeps an image when it has at least one annotation (crowd included) and not
  every annotation's bbox has width <= 1 or height <= 1 (117,266 of COCO 2017 train);
- per image, in order: crowd annotations removed; bbox xywh -> xyxy (continuous, no "- 1")
  clipped to the image, and removed when it has no positive width or height; polygons with
  fewer than 3 points removed; an instance left without a polygon removed. A kept image may
  end with no instance (only crowd annotations); it stays, as in the reference.
- `--mode eval` keeps every image. Its shards hold the same cleaned non-crowd instances;
  crowd annotations are counted, not stored, because evaluation reads the original JSON.
Every image is decoded once: one that is missing, does not decode, or whose size differs from
the JSON is left out and listed in the manifest by file name.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.shard_format import (
    GROUPS,
    MANIFEST_NAME,
    Sample,
    ShardFormatError,
    file_sha256,
    index_name,
    orientation,
    read_index,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)

MODES = ("train", "eval")
REENCODE_QUALITY = 95

# Reasons, as they appear in the manifest's `dropped` and `repaired` counts.
NO_ANNOTATION = "image: no annotation (train filter)"
ONLY_EMPTY_BOXES = "image: every bbox has width or height <= 1 (train filter)"
FILE_MISSING = "image: file missing or unreadable"
UNDECODABLE = "image: does not decode"
SIZE_MISMATCH = "image: decoded size differs from the annotation file"
CROWD = "instance: crowd (not used for training; evaluation reads the original annotation file)"
EMPTY_BOX = "instance: no positive width or height after clipping"
SHORT_POLYGON = "polygon: fewer than 3 points"
NO_POLYGON = "instance: no polygon left"
BOX_CLIPPED = "instance: bbox clipped to the image"
REENCODED = "image: re-encoded as JPEG (source was not an RGB or grayscale JPEG)"

INSTANCES_NOTE = {
    "train": "non-crowd instances after the reference rules; images kept by the reference filter",
    "eval": "every image; non-crowd instances after the reference rules; crowd annotations are "
    "not stored because evaluation reads the original annotation file",
}


class CocoInputError(ValueError):
    """The images folder or annotation file cannot be sharded; the message names it and the fix."""


@dataclass
class ImageJob:
    """One image to shard: where its JPEG is and its cleaned ground truth."""

    image_id: int
    file_name: str
    height: int
    width: int
    path: Path
    boxes: np.ndarray  # float32 [N, 4] xyxy
    labels: np.ndarray  # int32 [N] contiguous 1..K
    polys: np.ndarray  # int32 [P, 3]
    verts: np.ndarray  # float32 [V, 2]


# ----------------------------------------------------------------------------- input checks


def load_coco_instances(annotations_file: Path) -> dict[str, Any]:
    """Read a COCO instances JSON and check the fields the sharder relies on."""
    path = Path(annotations_file)
    if not path.is_file():
        raise CocoInputError(f"{path}: no such annotation file; pass a COCO instances JSON with --annotations")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoInputError(f"{path} is not valid JSON ({e}); pass a COCO instances JSON") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise CocoInputError(
            f"{path} is not in COCO instances format (needs lists 'images', 'annotations' and 'categories')"
        )
    _check_records(path, data["images"], "image", {"id": int, "file_name": str, "height": int, "width": int})
    _check_records(path, data["categories"], "category", {"id": int, "name": str})
    _check_records(
        path, data["annotations"], "annotation",
        {"id": int, "image_id": int, "category_id": int, "bbox": list, "iscrowd": int, "segmentation": (list, dict)},
    )
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    if len(image_ids) != len(data["images"]):
        raise CocoInputError(f"{path} lists the same image id twice; fix the annotation file")
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise CocoInputError(f"{path}: annotation {ann['id']} names unknown image {ann['image_id']}; fix the file")
        if ann["category_id"] not in category_ids:
            raise CocoInputError(
                f"{path}: annotation {ann['id']} names unknown category {ann['category_id']}; fix the file"
            )
        if len(ann["bbox"]) != 4 or not all(isinstance(v, (int, float)) for v in ann["bbox"]):
            raise CocoInputError(f"{path}: annotation {ann['id']} has a bbox that is not 4 numbers; fix the file")
        if not ann["iscrowd"] and isinstance(ann["segmentation"], list):
            if any(not isinstance(p, list) or len(p) % 2 for p in ann["segmentation"]):
                raise CocoInputError(
                    f"{path}: annotation {ann['id']} has a polygon that is not a flat list of x, y pairs; fix the file"
                )
    return data


def _check_records(path: Path, records: list, kind: str, fields: dict[str, type | tuple[type, ...]]) -> None:
    for record in records:
        if not isinstance(record, dict):
            raise CocoInputError(f"{path} is not in COCO instances format: one {kind} entry is not an object")
        for name, types in fields.items():
            if not isinstance(record.get(name), types):
                raise CocoInputError(
                    f"{path} is not in COCO instances format: {kind} {record.get('id', '?')} "
                    f"lacks a valid {name!r} field"
                )


def category_map(categories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Contiguous ids 1..K in COCO-id order, each with its COCO id and name (stored in the manifest)."""
    ordered = sorted(categories, key=lambda c: c["id"])
    return [{"id": i, "coco_id": c["id"], "name": c["name"]} for i, c in enumerate(ordered, start=1)]


# ----------------------------------------------------------------------------- data rules


def _has_only_empty_bbox(anns: list[dict[str, Any]]) -> bool:
    return all(any(side <= 1 for side in ann["bbox"][2:]) for ann in anns)


def keep_image_for_training(anns: list[dict[str, Any]], dropped: Counter) -> bool:
    """The reference image filter; `anns` includes crowd annotations, as in the reference."""
    if not anns:
        dropped[NO_ANNOTATION] += 1
        return False
    if _has_only_empty_bbox(anns):
        dropped[ONLY_EMPTY_BOXES] += 1
        return False
    return True


def clean_instances(
    anns: list[dict[str, Any]],
    height: int,
    width: int,
    contiguous_id: dict[int, int],
    dropped: Counter,
    repaired: Counter,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reference per-image rules: returns (boxes xyxy, labels, polys, verts) in shard layout."""
    boxes, labels, polys, verts = [], [], [], []
    num_verts = 0
    for ann in anns:
        if ann["iscrowd"]:
            dropped[CROWD] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = [min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
        if box[2] <= box[0] or box[3] <= box[1]:
            dropped[EMPTY_BOX] += 1
            continue
        if box != [x, y, x + w, y + h]:
            repaired[BOX_CLIPPED] += 1
        segmentation = ann["segmentation"] if isinstance(ann["segmentation"], list) else []
        polygons = [p for p in segmentation if len(p) >= 6]
        dropped[SHORT_POLYGON] += len(segmentation) - len(polygons)
        if not polygons:
            dropped[NO_POLYGON] += 1
            continue
        instance = len(labels)
        for polygon in polygons:
            polys.append((instance, num_verts, num_verts + len(polygon) // 2))
            verts.append(np.asarray(polygon, dtype=np.float32).reshape(-1, 2))
            num_verts += len(polygon) // 2
        boxes.append(box)
        labels.append(contiguous_id[ann["category_id"]])
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int32),
        np.asarray(polys, dtype=np.int32).reshape(-1, 3),
        np.concatenate(verts) if verts else np.zeros((0, 2), np.float32),
    )


# ----------------------------------------------------------------------------- images


def read_checked_jpeg(job: ImageJob) -> tuple[bytes | None, str | None]:
    """Decode the image once: (bytes to store, None), or (None, reason it is left out).

    The original bytes are kept when they are an RGB or grayscale JPEG (what the GPU decoder
    reads directly); any other decodable image is re-encoded once as a JPEG.
    """
    try:
        data = job.path.read_bytes()
    except OSError:
        return None, FILE_MISSING
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: truncated or corrupt data raises here
            if image.size != (job.width, job.height):
                return None, SIZE_MISMATCH
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return data, None
            out = io.BytesIO()
            image.convert("L" if image.mode in ("L", "LA", "I;16") else "RGB").save(
                out, format="JPEG", quality=REENCODE_QUALITY
            )
            return out.getvalue(), REENCODED
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, UNDECODABLE


def _write_one_shard(task: tuple[Path, list[ImageJob]]) -> dict[str, Any]:
    """Worker: decode and write one shard; returns its manifest entry and what was left out."""
    path, jobs = task
    excluded: list[tuple[str, str]] = []
    reencoded = 0

    def samples() -> Iterator[Sample]:
        nonlocal reencoded
        for job in jobs:
            jpeg, reason = read_checked_jpeg(job)
            if jpeg is None:
                excluded.append((job.file_name, reason))
                continue
            reencoded += reason == REENCODED
            yield Sample(
                image_id=job.image_id, file_name=job.file_name, height=job.height, width=job.width, jpeg=jpeg,
                boxes=job.boxes, labels=job.labels, polys=job.polys, verts=job.verts,
            )

    entry = write_shard(path, samples())
    if entry["samples"] == 0:  # every image was left out: no empty tar for readers to trip on
        path.unlink()
        path.with_name(index_name(path.name)).unlink()
        entry = None
    return {"entry": entry, "excluded": excluded, "reencoded": reencoded, "images": len(jobs)}


# ----------------------------------------------------------------------------- sharding


def plan_jobs(
    data: dict[str, Any], images_dir: Path, mode: str, dropped: Counter, repaired: Counter
) -> list[ImageJob]:
    """Apply the mode's image filter and the per-image rules; returns jobs in image-id order."""
    contiguous_id = {c["coco_id"]: c["id"] for c in category_map(data["categories"])}
    anns_by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    jobs = []
    for image in sorted(data["images"], key=lambda i: i["id"]):
        anns = anns_by_image[image["id"]]
        if mode == "train" and not keep_image_for_training(anns, dropped):
            continue
        arrays = clean_instances(anns, image["height"], image["width"], contiguous_id, dropped, repaired)
        jobs.append(
            ImageJob(image["id"], image["file_name"], image["height"], image["width"],
                     images_dir / image["file_name"], *arrays)
        )
    return jobs


def assign_shards(
    jobs: list[ImageJob], out_dir: Path, split: str, samples_per_shard: int, seed: int
) -> list[tuple[Path, list[ImageJob]]]:
    """Shuffle with the seed, then cut each orientation group into shards of `samples_per_shard`."""
    order = np.random.default_rng(seed).permutation(len(jobs))
    tasks = []
    for group in GROUPS:
        members = [jobs[i] for i in order if orientation(jobs[i].height, jobs[i].width) == group]
        for index, start in enumerate(range(0, len(members), samples_per_shard)):
            tasks.append((out_dir / shard_name(split, group, index), members[start : start + samples_per_shard]))
    return tasks


def default_split(annotations_file: Path) -> str:
    """`instances_train2017.json` -> `train2017`: the split name used in shard names."""
    return Path(annotations_file).stem.removeprefix("instances_")


def shard_coco(
    images_dir: Path,
    annotations_file: Path,
    out_dir: Path,
    *,
    mode: str,
    samples_per_shard: int = 1000,
    workers: int = 1,
    seed: int = 0,
    split: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Shard a COCO split into `out_dir`; returns the manifest (also written as manifest.json).

    Re-running with the same input and arguments reproduces identical files, whatever `workers`.
    """
    images_dir, annotations_file, out_dir = Path(images_dir), Path(annotations_file), Path(out_dir)
    if mode not in MODES:
        raise CocoInputError(f"mode must be one of {MODES}, got {mode!r}")
    if samples_per_shard < 1 or workers < 1:
        raise CocoInputError("samples_per_shard and workers must be at least 1")
    if not images_dir.is_dir():
        raise CocoInputError(f"{images_dir}: no such images folder; pass the folder of JPEGs with --images")
    split = split or default_split(annotations_file)
    if not re.fullmatch(r"[A-Za-z0-9_.]+", split):
        raise CocoInputError(f"split name {split!r} may hold only letters, digits, '_' and '.'; pass --split")
    data = load_coco_instances(annotations_file)

    dropped: Counter = Counter()
    repaired: Counter = Counter()
    jobs = plan_jobs(data, images_dir, mode, dropped, repaired)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is not a finished shard set until the end
    tasks = assign_shards(jobs, out_dir, split, samples_per_shard, seed)

    results = []
    # Workers start before the progress bar's monitor thread exists, so nothing is forked mid-update.
    with _worker_map(workers, len(tasks)) as run, tqdm(
        total=len(jobs), unit="img", desc=f"sharding {split}", disable=not progress
    ) as bar:
        for result in run(_write_one_shard, tasks):
            results.append(result)
            bar.update(result["images"])

    shards = sorted((r["entry"] for r in results if r["entry"] is not None), key=lambda s: s["name"])
    excluded = sorted(e for r in results for e in r["excluded"])
    dropped.update(reason for _, reason in excluded)
    repaired[REENCODED] += sum(r["reencoded"] for r in results)
    left_out = {name for name, _ in excluded}
    stored = [job for job in jobs if job.file_name not in left_out]
    _remove_stale_shards(out_dir, split, {s["name"] for s in shards})

    manifest = {
        "split": split,
        "mode": mode,
        "instances": INSTANCES_NOTE[mode],
        "annotations_file": annotations_file.name,
        "annotations_sha256": file_sha256(annotations_file),
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "categories": category_map(data["categories"]),
        "max_instances": max((len(j.labels) for j in stored), default=0),
        "max_polygons": max((len(j.polys) for j in stored), default=0),
        "max_vertices": max((len(j.verts) for j in stored), default=0),
        "dropped": dict(sorted((k, v) for k, v in dropped.items() if v)),
        "repaired": dict(sorted((k, v) for k, v in repaired.items() if v)),
        "undecodable": [name for name, _ in excluded],
    }
    write_manifest(out_dir, manifest)
    return read_manifest(out_dir)


@contextlib.contextmanager
def _worker_map(workers: int, num_tasks: int) -> Iterator[Callable]:
    """A `map` over worker processes, results in completion order; in-process for one worker."""
    if workers == 1 or num_tasks <= 1:
        yield map
        return
    # "fork" where the OS has it: workers start at once and work when the caller is an
    # interactive session or a `python -` script, which "spawn" would have to re-import.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(min(workers, num_tasks)) as pool:
        yield pool.imap_unordered


def _remove_stale_shards(out_dir: Path, split: str, keep: set[str]) -> None:
    """Delete shards of this split left by an earlier run with other settings (ours only, by name)."""
    pattern = re.compile(rf"{re.escape(split)}-({'|'.join(GROUPS)})-\d{{6}}\.(tar|idx)")
    keep_all = keep | {index_name(name) for name in keep}
    for path in out_dir.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep_all:
            path.unlink()


# ----------------------------------------------------------------------------- verification


def verify_shards(out_dir: Path) -> None:
    """Check every shard against the manifest; raises ShardFormatError naming the first bad shard."""
    manifest = read_manifest(out_dir)
    for entry in manifest["shards"]:
        _verify_shard(Path(out_dir) / entry["name"], entry)


def _verify_shard(path: Path, entry: dict[str, Any]) -> None:
    fix = "re-run tools/shard_coco.py to rewrite it"
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing; {fix}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardFormatError(f"{path} has {size} bytes, manifest.json says {entry['bytes']} (truncated?); {fix}")
    if file_sha256(path) != entry["sha256"]:
        raise ShardFormatError(f"{path}: sha256 differs from manifest.json (the file is damaged); {fix}")
    index_path = path.with_name(index_name(path.name))
    if not index_path.is_file():
        raise ShardFormatError(f"{index_path} is missing; {fix}")
    index = read_index(index_path)
    if len(index) != entry["samples"]:
        raise ShardFormatError(f"{index_path} lists {len(index)} samples, manifest.json says {entry['samples']}; {fix}")
    # Every tar member must be indexed once, at its data offset and size, under its component.
    with tarfile.open(path) as tar:
        in_tar = sorted((m.offset_data, m.size, m.name.rsplit(".", 1)[-1]) for m in tar.getmembers())
    in_index = sorted((offset, size, component) for sample in index for component, (offset, size) in sample.items())
    if in_index != in_tar:
        raise ShardFormatError(f"{index_path} does not match the members of {path.name}; {fix}")
