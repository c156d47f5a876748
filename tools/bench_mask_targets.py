"""Mask-target time: ours on the device (both paths) against the reference's way, pycocotools on the host.

Examples:
    python tools/bench_mask_targets.py                               # 2 images x 128 RoIs, COCO-like polygons
    python tools/bench_mask_targets.py --threads 1 --repeats 7       # a shared CPU machine
    python tools/bench_mask_targets.py --images 12 --device cuda --json runs/bench_mask_targets.json

The batch is COCO-like: per image 8 instances of one star-shaped polygon of 12 to 40 vertices
(every third with a second part), about 250 vertices per image, padded to the next power of two
as `make_batch` pads; each RoI is its instance's box jittered by 8 % of its size. Timed, in
turns, median of `--repeats`:
- `reference`: what the reference does on the host, one RoI at a time: the float32 crop and scale
  of the instance's polygons, pycocotools `frPyObjects`, `merge`, `decode`;
- `own_instance`: `polygon_mask_targets` off the sync-free path (each RoI reads its instance's edges);
- `every_edge`: the sync-free path (each RoI reads every edge of its image), what CUDA training runs.
Each result is checked against the reference's targets before it is timed. Prints wall and
process CPU milliseconds of each and their ratios to `reference` (below 1 is faster).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils

from model.mask_targets import polygon_mask_targets
from pipeline.batch import padded_count
from tools import write_json

RESOLUTION = 28
INSTANCES = 8


def coco_like(images: int, rois: int, seed: int = 0) -> dict[str, Any]:
    """Polygons per image (a list of instances of parts), inclusive RoI boxes [B, M, 4] and their instances [B, M]."""
    rng = np.random.default_rng(seed)
    polygons, boxes, owners = [], [], []
    for _ in range(images):
        instances = []
        for g in range(INSTANCES):
            centre, size = rng.uniform([100, 100], [1200, 700]), rng.uniform(15, 200)
            parts = [_star(rng, centre, 0.4 * size, size, int(rng.integers(12, 41)))]
            if g % 3 == 0:
                parts.append(_star(rng, centre + size, 0.2 * size, 0.5 * size, int(rng.integers(6, 21))))
            instances.append(parts)
        extent = np.array([np.concatenate([np.concatenate(p).min(0), np.concatenate(p).max(0)]) for p in instances])
        owner = rng.integers(0, INSTANCES, rois)
        box = extent[owner] + rng.normal(0, 0.08, (rois, 4)) * np.tile(extent[owner, 2:] - extent[owner, :2], 2)
        box[:, 2:] = np.maximum(box[:, 2:], box[:, :2] + 2)
        polygons.append(instances)
        boxes.append(box)
        owners.append(owner)
    return {
        "polygons": polygons,
        "boxes": torch.tensor(np.array(boxes), dtype=torch.float32),
        "instance": torch.tensor(np.array(owners)),
    }


def _star(rng: np.random.Generator, centre: np.ndarray, low: float, high: float, n: int) -> np.ndarray:
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radius = rng.uniform(low, high, n)
    return (centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radius[:, None]).astype(np.float32)


def batch_polygons(polygons: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verts [B, V, 2], polys [B, P, 3], num_polys [B] as `make_batch` lays them out (V, P padded to powers of two)."""
    rows = [[(g, part) for g, parts in enumerate(instances) for part in parts] for instances in polygons]
    num_verts = padded_count(max(sum(len(p) for _, p in r) for r in rows), 1 << 30)
    num_polys = padded_count(max(len(r) for r in rows), 1 << 30)
    verts = torch.zeros(len(rows), num_verts, 2)
    polys = torch.tensor([-1, 0, 0], dtype=torch.int32).repeat(len(rows), num_polys, 1)
    for b, image_rows in enumerate(rows):
        cursor = 0
        for p, (g, part) in enumerate(image_rows):
            verts[b, cursor : cursor + len(part)] = torch.from_numpy(part)
            polys[b, p] = torch.tensor([g, cursor, cursor + len(part)])
            cursor += len(part)
    return verts, polys, torch.tensor([len(r) for r in rows], dtype=torch.int32)


def reference_targets(polygons: list, boxes: torch.Tensor, instance: torch.Tensor) -> torch.Tensor:
    """The reference's `project_masks_on_boxes`, one RoI at a time on the host: [B, M, R, R]."""
    out = np.zeros((*instance.shape, RESOLUTION, RESOLUTION), dtype=np.float32)
    for b, (image_boxes, owners) in enumerate(zip(boxes.numpy(), instance.tolist())):
        for m, (box, g) in enumerate(zip(image_boxes, owners)):
            x1, y1, x2, y2 = box
            scale = np.array([RESOLUTION / float(max(x2 - x1, 1)), RESOLUTION / float(max(y2 - y1, 1))], np.float32)
            framed = [((p - np.array([x1, y1], np.float32)) * scale).flatten().tolist() for p in polygons[b][g]]
            rles = mask_utils.frPyObjects(framed, RESOLUTION, RESOLUTION)
            out[b, m] = mask_utils.decode(mask_utils.merge(rles))
    return torch.from_numpy(out)


def run_benchmark(images: int, rois: int, repeats: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    data = coco_like(images, rois, seed)
    verts, polys, num_polys = batch_polygons(data["polygons"])
    on_device = [t.to(device) for t in (data["boxes"], data["instance"], verts, polys, num_polys)]

    def ours(sync_free: bool) -> Callable[[], torch.Tensor]:
        return lambda: polygon_mask_targets(*on_device, RESOLUTION, sync_free).cpu()  # .cpu(): waits for the device

    runs = {
        "reference": lambda: reference_targets(data["polygons"], data["boxes"], data["instance"]),
        "own_instance": ours(False),
        "every_edge": ours(True),
    }
    expected = runs["reference"]()
    for name, run in runs.items():
        if not torch.equal(run(), expected):
            raise AssertionError(f"{name}'s mask targets differ from pycocotools'")
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            seconds[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    result: dict[str, Any] = {
        "images": images, "rois_per_image": rois, "vertices_per_image": verts.shape[1],
        "device": str(device), "threads": torch.get_num_threads(),
    }  # fmt: skip
    for name, times in seconds.items():
        result[f"{name}_wall_ms"] = 1000 * statistics.median(t[0] for t in times)
        result[f"{name}_cpu_ms"] = 1000 * statistics.median(t[1] for t in times)
    for name in ("own_instance", "every_edge"):
        result[f"{name}_wall_ratio"] = result[f"{name}_wall_ms"] / result["reference_wall_ms"]
        result[f"{name}_cpu_ratio"] = result[f"{name}_cpu_ms"] / result["reference_cpu_ms"]
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="images in the batch")
    parser.add_argument("--rois", type=int, default=128, help="positive RoIs per image (the reference's most: 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each computation, in turns")
    parser.add_argument("--device", default="cpu", help="where ours runs (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_benchmark(args.images, args.rois, args.repeats, torch.device(args.device))
    print(f"{args.images} images x {args.rois} RoIs, {result['vertices_per_image']} vertices per image (padded), "
          f"{result['threads']} thread(s)")
    for name in ("reference", "own_instance", "every_edge"):
        ratios = "" if name == "reference" else (
            f"  ratio to reference: wall {result[f'{name}_wall_ratio']:.2f}, CPU {result[f'{name}_cpu_ratio']:.2f}"
        )
        print(f"{name:13s} wall {result[f'{name}_wall_ms']:8.1f} ms  CPU {result[f'{name}_cpu_ms']:8.1f} ms{ratios}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
