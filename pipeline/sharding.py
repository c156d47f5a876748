"""COCO instances JSON + JPEG folder -> WebDataset shards (the write side of pipeline/shard_format.py).

`shard_coco` validates the input, applies the reference's data rules, maps categories to
contiguous ids, shuffles with a seed, groups by orientation, and writes shards in parallel
worker processes (one shard per task, so the output does not depend on the worker count).
A new set is written into a staging folder beside `--out` and swapped in only when complete,
so a run that fails (a full disk, an interrupt) leaves the previous set as it was.
`verify_shards` checks a finished folder against its manifest and every sample against the format.

Reference rules (maskrcnn-benchmark's COCODataset, which the MLPerf reference trains on):
- `--mode train` keeps an image when it has at least one annotation (crowd included) and not
  every annotation's bbox has width <= 1 or height <= 1 (117,266 of COCO 2017 train);
- before the filter, annotations whose bbox has a NaN or infinite coordinate are dropped (not in
  the reference, which has none: see `finite_annotations`);
- per image, in order: crowd annotations removed; bbox xywh -> xyxy clipped to the image and
  removed when its width or height is <= 1 pixel (the reference's `clip_to_image(remove_empty=True)`
  on its inclusive boxes, x2 = x + w - 1 clamped to [0, W - 1], kept when x2 > x1); stored
  continuous (x + w, no "- 1"); an RLE mask (as labeling tools export instance masks) becomes one
  polygon whose fill is exactly the mask (pipeline/coco_masks.py; the manifest's `rle_masks`
  records each conversion's IoU against pycocotools' decode); polygons with fewer than 3 points or
  a NaN or infinite coordinate removed; an instance left without a polygon kept, for its box (its
  mask target is empty: the reference keeps it too, and would rasterize what it has). A kept
  image may end with no instance (only crowd annotations); it stays, as in the reference.
- `--mode eval` keeps every image. Its shards hold the same cleaned non-crowd instances;
  crowd annotations are counted, not stored, because evaluation reads the original JSON, so a
  file with an annotation that COCO's evaluation cannot score (pipeline/coco_masks.py) is refused.
Every image is decoded once: one that is missing, does not decode (or would take more memory
than PIL's decompression-bomb limit allows), or whose size differs from the JSON is left out and listed in the manifest by file name. A run that stores no image at all
(a wrong --images folder) is an error, not an empty set.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import stat
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.coco_masks import RleConversions, SegmentationError, scoring_refusal
from pipeline.shard_format import (
    GROUPS,
    MANIFEST_NAME,
    SHARD_STEM,
    Sample,
    ShardFormatError,
    decode_sample,
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
TOO_LARGE = "image: more pixels than PIL decodes safely (Image.MAX_IMAGE_PIXELS)"
SIZE_MISMATCH = "image: decoded size differs from the annotation file"
CROWD = "instance: crowd (not used for training; evaluation reads the original annotation file)"
EMPTY_BOX = "instance: bbox width or height <= 1 pixel after clipping (the reference's remove_empty)"
NON_FINITE_BOX = "instance: bbox has a NaN or infinite coordinate"
SHORT_POLYGON = "polygon: fewer than 3 points"
NON_FINITE_POLYGON = "polygon: NaN or infinite coordinate (in float32)"
NO_POLYGON = "instance: no polygon left (kept for its box, with an empty mask)"
BOX_CLIPPED = "instance: bbox clipped to the image"
RLE_CONVERTED = "instance: RLE mask converted to an exact polygon (manifest: rle_masks)"
REENCODED = "image: re-encoded as JPEG (source was not an RGB or grayscale JPEG)"

INSTANCES_NOTE = {
    "train": "non-crowd instances after the reference rules; images kept by the reference filter",
    "eval": "every image; non-crowd instances after the reference rules; crowd annotations are "
    "not stored because evaluation reads the original annotation file",
}


class CocoInputError(ValueError):
    """The images folder or annotation file cannot be sharded; the message names it and the fix."""


class ShardWriteError(ValueError):
    """The shard folder cannot be written or replaced; the message names it, the fix, and what was kept."""


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
    except OSError as e:
        raise CocoInputError(f"cannot read {path} ({e.strerror}); make it readable or pass another --annotations") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoInputError(f"{path} is not valid JSON ({e}); pass a COCO instances JSON") from None
    except RecursionError:  # Python's json reader recurses once per level of nesting
        raise CocoInputError(
            f"{path} nests arrays or objects too deeply to be COCO instances; pass a COCO instances JSON"
        ) from None
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
            if any(not isinstance(p, list) or len(p) % 2 or not set(map(type, p)) <= {int, float}
                   for p in ann["segmentation"]):
                raise CocoInputError(
                    f"{path}: annotation {ann['id']} has a polygon that is not a flat list of x, y numbers; fix the file"
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


def finite_annotations(anns: list[dict[str, Any]], dropped: Counter) -> list[dict[str, Any]]:
    """`anns` without those whose bbox has a NaN or infinite coordinate, counted under their own reason.

    COCO's own files have none, but converted or hand-made ones can (Python's json reads `NaN`).
    Such a box cannot be clipped or repaired, and stored it would stop training on non-finite
    losses. One broken annotation should neither stop a sharding run over 860k nor reach the
    loaders, so it is dropped and counted, as the reference drops other unusable instances.
    It is dropped before the image filter, which then judges the image by what will be stored.
    """
    finite = [ann for ann in anns if all(math.isfinite(v) for v in ann["bbox"])]
    dropped[NON_FINITE_BOX] += len(anns) - len(finite)
    return finite


def keep_image_for_training(anns: list[dict[str, Any]], dropped: Counter) -> bool:
    """The reference image filter; `anns` includes crowd annotations, as in the reference."""
    if not anns:
        dropped[NO_ANNOTATION] += 1
        return False
    if _has_only_empty_bbox(anns):
        dropped[ONLY_EMPTY_BOXES] += 1
        return False
    return True


def reference_keeps_box(x: float, y: float, w: float, h: float, width: int, height: int) -> bool:
    """Whether the reference keeps a COCO bbox (xywh) of a `width` x `height` image.

    Its COCODataset makes the float32 inclusive box (x, y, x + max(w - 1, 0), ...), clamps every
    coordinate to [0, W - 1] or [0, H - 1] and keeps the box when x2 > x1 and y2 > y1: a box of
    width or height <= 1 pixel, or one that ends up so after the clamp, is dropped.
    """
    x, y, w, h = np.float32(x), np.float32(y), np.float32(w), np.float32(h)
    one = np.float32(1)
    x1, y1 = np.clip(x, 0, width - 1), np.clip(y, 0, height - 1)
    x2, y2 = np.clip(x + max(w - one, 0), 0, width - 1), np.clip(y + max(h - one, 0), 0, height - 1)
    return bool(x2 > x1 and y2 > y1)


def clean_instances(
    anns: list[dict[str, Any]],
    height: int,
    width: int,
    contiguous_id: dict[int, int],
    dropped: Counter,
    repaired: Counter,
    rle_masks: RleConversions,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reference per-image rules: returns (boxes xyxy, labels, polys, verts) in shard layout.

    An RLE mask (as labeling tools export instance masks) becomes one exact polygon (`rle_masks`).
    """
    boxes, labels, polys, verts = [], [], [], []
    num_verts = 0
    for ann in anns:
        if ann["iscrowd"]:
            dropped[CROWD] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        if not reference_keeps_box(x, y, w, h, width, height):
            dropped[EMPTY_BOX] += 1
            continue
        box = [min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
        if box != [x, y, x + w, y + h]:
            repaired[BOX_CLIPPED] += 1
        segmentation = ann["segmentation"]
        if isinstance(segmentation, dict):
            segmentation = rle_masks.polygons(ann, height, width)
            repaired[RLE_CONVERTED] += bool(segmentation)
        polygons = [p for p in segmentation if len(p) >= 6]
        dropped[SHORT_POLYGON] += len(segmentation) - len(polygons)
        with np.errstate(over="ignore"):  # a coordinate beyond float32 becomes infinite, and is dropped
            polygons = [np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in polygons]
        finite = [p for p in polygons if np.isfinite(p).all()]
        dropped[NON_FINITE_POLYGON] += len(polygons) - len(finite)
        if not finite:
            repaired[NO_POLYGON] += 1
        instance = len(labels)
        for polygon in finite:
            polys.append((instance, num_verts, num_verts + len(polygon)))
            verts.append(polygon)
            num_verts += len(polygon)
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
    except Image.DecompressionBombError:
        return None, TOO_LARGE
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
    data: dict[str, Any], images_dir: Path, mode: str, dropped: Counter, repaired: Counter, rle_masks: RleConversions
) -> list[ImageJob]:
    """Apply the mode's image filter and the per-image rules; returns jobs in image-id order."""
    contiguous_id = {c["coco_id"]: c["id"] for c in category_map(data["categories"])}
    anns_by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    jobs = []
    for image in sorted(data["images"], key=lambda i: i["id"]):
        anns = finite_annotations(anns_by_image[image["id"]], dropped)
        if mode == "train" and not keep_image_for_training(anns, dropped):
            continue
        arrays = clean_instances(anns, image["height"], image["width"], contiguous_id, dropped, repaired, rle_masks)
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
    A shard set already in `out_dir` is replaced only once the new one is complete.
    """
    images_dir, annotations_file, out_dir = Path(images_dir), Path(annotations_file), Path(out_dir)
    if mode not in MODES:
        raise CocoInputError(f"mode must be one of {MODES}, got {mode!r}")
    if samples_per_shard < 1 or workers < 1:
        raise CocoInputError("--samples-per-shard and --workers must be at least 1")
    if seed < 0:
        raise CocoInputError(f"--seed must be a non-negative integer, got {seed}")
    if not images_dir.is_dir():
        raise CocoInputError(f"{images_dir}: no such images folder; pass the folder of JPEGs with --images")
    split = split or default_split(annotations_file)
    if not re.fullmatch(r"[A-Za-z0-9_.]+", split):
        raise CocoInputError(f"split name {split!r} may hold only letters, digits, '_' and '.'; pass --split")
    out_dir = check_output_folder(out_dir)  # before the slow part, so a bad --out fails at once
    data = load_coco_instances(annotations_file)

    dropped: Counter = Counter()
    repaired: Counter = Counter()
    rle_masks = RleConversions()
    if mode == "eval":  # evaluation will score this file: what it cannot score stops here
        refusal = scoring_refusal(data, str(annotations_file), "fix or remove it in the file, then shard it again")
        if refusal:
            raise CocoInputError(refusal)
    try:
        jobs = plan_jobs(data, images_dir, mode, dropped, repaired, rle_masks)
    except SegmentationError as e:
        raise CocoInputError(f"{annotations_file}: {e}; fix the file") from None
    try:
        with replacing_folder(out_dir) as staging:
            tasks = assign_shards(jobs, staging, split, samples_per_shard, seed)
            results = []
            # Workers start before the progress bar's monitor thread exists, so nothing is forked mid-update.
            with _completed(_write_one_shard, tasks, workers) as finished, tqdm(
                total=len(jobs), unit="img", desc=f"sharding {split}", disable=not progress
            ) as bar:
                for result in finished:
                    results.append(result)
                    bar.update(result["images"])

            shards = sorted((r["entry"] for r in results if r["entry"] is not None), key=lambda s: s["name"])
            excluded = sorted(e for r in results for e in r["excluded"])
            dropped.update(reason for _, reason in excluded)
            repaired[REENCODED] += sum(r["reencoded"] for r in results)
            if not shards:
                raise CocoInputError(_nothing_stored(images_dir, annotations_file, len(jobs), excluded))
            left_out = {name for name, _ in excluded}
            stored = [job for job in jobs if job.file_name not in left_out]
            write_manifest(staging, {
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
                "rle_masks": rle_masks.summary(),
                "undecodable": [name for name, _ in excluded],
            })
    except OSError as e:
        raise _write_error(e, out_dir) from None
    except BrokenProcessPool:
        kept = "the shard set there is unchanged" if (out_dir / MANIFEST_NAME).is_file() else "nothing was left behind"
        raise ShardWriteError(
            f"a worker process died while sharding into {out_dir} (when memory runs out, the kernel's OOM killer "
            f"ends one so); run again with fewer --workers; {kept}"
        ) from None
    return read_manifest(out_dir)


def _nothing_stored(images_dir: Path, annotations_file: Path, planned: int, excluded: list[tuple[str, str]]) -> str:
    if not planned:
        return f"{annotations_file}: no image passes the filter, so there is nothing to shard; check the file and --mode"
    reasons = Counter(reason for _, reason in excluded).most_common()
    counts = ", ".join(f"{n} x {reason!r}" for reason, n in reasons)
    return (
        f"none of the {planned} images of {annotations_file} could be stored ({counts}); "
        f"check that {images_dir} is the folder of its JPEGs"
    )


@contextlib.contextmanager
def _completed(work: Callable[[Any], Any], tasks: list, workers: int) -> Iterator[Iterator[Any]]:
    """`work(task)` for every task, in worker processes (in this one for one worker), results in completion order.

    A ProcessPoolExecutor rather than a multiprocessing.Pool: a worker that dies (the OOM killer, a
    SIGTERM sent to the whole process group) leaves a Pool waiting for ever, on the lost task or on
    a queue lock the dead worker held, where the executor reports it (BrokenProcessPool). When the
    block fails or is interrupted, the workers are killed at once: their shards are no longer wanted,
    and one may be stuck (a hung network file system) where waiting would never end.
    """
    if workers == 1 or len(tasks) <= 1:
        yield map(work, tasks)
        return
    # "fork" where the OS has it: workers start at once and work when the caller is an
    # interactive session or a `python -` script, which "spawn" would have to re-import.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    before = set(multiprocessing.active_children())
    executor = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=_leave_signals_to_parent)
    try:
        futures = [executor.submit(work, task) for task in tasks]
        yield (future.result() for future in as_completed(futures))
    except BaseException:
        for process in set(multiprocessing.active_children()) - before:  # this executor's workers
            process.kill()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _leave_signals_to_parent() -> None:
    """A worker's signals: Ctrl-C and a hang-up, which reach the terminal's whole process group, are
    the parent's to handle (it stops the workers and removes the staging folder in one place);
    SIGTERM ends a worker quietly instead of running the handler a fork copied from the parent
    (tools/shard_coco.py raises there, which would print a traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------- replacing a shard folder

# What a shard folder may hold: the manifest, tars and indices (any split), and their temporary names.
_SET_FILE = re.compile(rf"(?:{re.escape(MANIFEST_NAME)}|{SHARD_STEM}\.(?:tar|idx))(?:\.tmp)?")
_STAGING_KINDS = ("incoming", "replaced")


def check_output_folder(out_dir: Path) -> Path:
    """The absolute `out_dir` if a new shard set can replace it, else ShardWriteError saying why.

    The folder may be new, empty, or a shard folder (so a re-shard replaces it); anything else in
    it would be lost by the swap, so such a folder is refused rather than emptied.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.is_symlink():
        out_dir = out_dir.resolve()  # replace the folder it points at, on its own file system
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardWriteError(f"--out {out_dir} is a file, not a folder; pass a new folder or a shard folder")
    if out_dir.is_dir():
        if os.path.ismount(out_dir):
            raise ShardWriteError(
                f"--out {out_dir} is a mount point, which cannot be swapped for a new shard set; pass a folder inside it"
            )
        try:
            foreign = sorted(p.name for p in out_dir.iterdir() if not _SET_FILE.fullmatch(p.name))
        except OSError as e:
            raise ShardWriteError(f"cannot list --out {out_dir} ({e.strerror}); pass a folder you can write") from None
        if foreign:
            raise ShardWriteError(
                f"--out {out_dir} holds files that are not part of a shard set ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); pass a new folder, an empty one or a shard folder"
            )
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise ShardWriteError(f"--out {out_dir} is read-only; make it writable or pass another folder")
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ShardWriteError(f"--out {out_dir} lies under {ancestor}, which is a file; pass another folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ShardWriteError(
            f"cannot write beside --out {out_dir}: {ancestor} is read-only; pass a folder in a writable place"
        )
    _remove_abandoned_staging(out_dir)
    return out_dir


def _staging_path(out_dir: Path, kind: str, pid: int | None = None) -> Path:
    return out_dir.with_name(f".{out_dir.name}.{kind}-{os.getpid() if pid is None else pid}")


def _remove_abandoned_staging(out_dir: Path) -> None:
    """Remove staging folders a killed run left beside `out_dir`; refuse while their run is alive."""
    if not out_dir.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.({'|'.join(_STAGING_KINDS)})-(\d+)")
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match:
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and _process_alive(pid):
            raise ShardWriteError(
                f"another shard_coco run (process {pid}) is writing {out_dir}; wait for it to finish or stop it"
            )
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextlib.contextmanager
def replacing_folder(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out_dir`; it replaces `out_dir` when the block succeeds.

    Writing the new set beside the old one keeps the old set usable until the new one is whole:
    a failure or an interrupt inside the block deletes the staging folder (and any parent folder
    this call created) and leaves `out_dir` as it was. The swap is two renames on one file system.
    """
    created = out_dir.parent
    while not created.parent.exists():
        created = created.parent
    created = None if created.exists() else created
    staging = _staging_path(out_dir, "incoming")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        if out_dir.is_dir():
            os.chmod(staging, stat.S_IMODE(out_dir.stat().st_mode))
        yield staging
        _swap(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _swap(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    replaced = _staging_path(out_dir, "replaced")
    os.rename(out_dir, replaced)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(replaced, out_dir)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


_WRITE_HINTS = {
    errno.ENOSPC: "free some space or pass an --out on another disk",
    errno.EDQUOT: "free some of your disk quota or pass an --out on another disk",
    errno.EFBIG: "a file grew past the size limit (ulimit -f); raise it or pass a smaller --samples-per-shard",
    errno.EACCES: "pass an --out in a folder you can write",
    errno.EPERM: "pass an --out in a folder you can write",
    errno.EROFS: "pass an --out on a writable file system",
}


def _write_error(error: OSError, out_dir: Path) -> ShardWriteError:
    hint = _WRITE_HINTS.get(error.errno, "check the disk and run again")
    kept = "the shard set there is unchanged" if (out_dir / MANIFEST_NAME).is_file() else "nothing was left behind"
    return ShardWriteError(f"cannot write the shards for {out_dir} ({error.strerror}); {hint}; {kept}")


# ----------------------------------------------------------------------------- verification


def verify_shards(out_dir: Path) -> None:
    """Check every shard against the manifest and every sample against the format, in one read of each tar.

    Raises ShardFormatError naming the first bad shard (and sample, when the damage is inside one).
    """
    manifest = read_manifest(out_dir)
    for entry in manifest["shards"]:
        _verify_shard(Path(out_dir) / entry["name"], entry, len(manifest["categories"]))


def _verify_shard(path: Path, entry: dict[str, Any], num_categories: int) -> None:
    fix = "re-shard with tools/shard_coco.py"
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing; {fix}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardFormatError(f"{path} has {size} bytes, manifest.json says {entry['bytes']} (truncated?); {fix}")
    index_path = path.with_name(index_name(path.name))
    if not index_path.is_file():
        raise ShardFormatError(f"{index_path} is missing; {fix}")
    index = read_index(index_path)
    if len(index) != entry["samples"]:
        raise ShardFormatError(f"{index_path} lists {len(index)} samples, manifest.json says {entry['samples']}; {fix}")
    try:
        sha256, in_tar = _scan_tar(path, num_categories)
    except (OSError, tarfile.TarError) as e:
        raise ShardFormatError(f"{path} is not a readable tar ({e}); {fix}") from None
    if sha256 != entry["sha256"]:
        raise ShardFormatError(f"{path}: sha256 differs from manifest.json (the file is damaged); {fix}")
    # Every tar member must be indexed once, at its data offset and size, under its name.
    in_index = sorted(
        (offset, size, f"{row.key}.{component}") for row in index for component, (offset, size) in row.members.items()
    )
    if in_index != sorted(in_tar):
        raise ShardFormatError(f"{index_path} does not match the members of {path.name}; {fix}")


def _scan_tar(path: Path, num_categories: int) -> tuple[str, list[tuple[int, int, str]]]:
    """Read a tar once, checking each sample with `decode_sample`; returns its sha256 and member layout."""
    layout = []
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # a stream: every byte is read once, in order
            key, members = None, {}
            for member in tar:
                member_key, _, component = member.name.rpartition(".")
                if member_key != key:
                    _check_sample(path, key, members, num_categories)
                    key, members = member_key, {}
                data = tar.extractfile(member)
                members[component] = data.read() if data is not None else b""
                layout.append((member.offset_data, member.size, member.name))
            _check_sample(path, key, members, num_categories)
        while reader.read(1 << 20):  # the end-of-archive padding counts in the sha256
            pass
    return reader.digest.hexdigest(), layout


def _check_sample(path: Path, key: str | None, members: dict[str, bytes], num_categories: int) -> None:
    if key is None:
        return
    try:
        decode_sample(members, key, num_categories)
    except ShardFormatError as e:
        raise ShardFormatError(f"{path} (sample {key}): {e}; re-shard with tools/shard_coco.py") from None


class _HashingReader:
    """A read-only file that hashes what passes through it."""

    def __init__(self, raw: io.BufferedReader):
        self.raw = raw
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data
