"""Training-step time of our Mask R-CNN with the same ground truth padded to different slot counts.

    python tools/bench_gt_slots.py --image-size 512 640 --batch-size 2 --slots 16 100 --iters 3
    python tools/bench_gt_slots.py --device cuda --image-size 800 1344 --batch-size 16 --slots 16 32 100

The real instances are the same in every variant (synthetic, 1..--instances per image); only
the padding differs: 100 slots is what padding to COCO's maxima gave every batch, 16-32 what
per-batch padding (pipeline/batch.py) gives most COCO batches. Steps alternate between the
variants; the median wall and CPU seconds of each are printed, and their ratios to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from model.build import build_model
from model.synthetic_batch import VERTS_PER_POLYGON, synthetic_batch
from pipeline.batch import Batch
from tools.bench_model import NUM_CLASSES, timed_step, training_step
from train.config import ConfigError, load_config
from train.output_paths import exit_if_overlapping


def padded_to(batch: Batch, slots: int) -> Batch:
    """`batch` with its ground truth padded to `slots` rows (boxes, labels, polygons; vertices to match)."""
    extra = slots - batch.boxes.shape[1]
    extra_verts = slots * VERTS_PER_POLYGON - batch.verts.shape[1]
    return replace(
        batch,
        boxes=F.pad(batch.boxes, (0, 0, 0, extra)),
        labels=F.pad(batch.labels, (0, extra)),
        polys=torch.cat([batch.polys, batch.polys.new_tensor([-1, 0, 0]).expand(len(batch), extra, 3)], dim=1),
        verts=F.pad(batch.verts, (0, 0, 0, extra_verts)),
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=[512, 640], help="padded image size")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--instances", type=int, default=16, help="most real instances per image (1..this, synthetic)")
    parser.add_argument("--slots", type=int, nargs="+", default=[16, 100], help="ground-truth slot counts to compare")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per variant (after one warm-up step each)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--config", type=Path, default=Path("configs/reference.yaml"), help="config whose model: section we build")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return parser


def main(args: argparse.Namespace) -> int:
    exit_if_overlapping("bench_gt_slots", {"--json": args.json}, {"--config": args.config})
    if args.iters < 1 or args.batch_size < 1 or min(args.slots) < args.instances:
        print("bench_gt_slots: --iters and --batch-size must be >= 1 and every --slots >= --instances", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)  # as the trainer does: denormal gradients otherwise dominate CPU steps
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model_cfg = load_config(args.config, []).model
    except ConfigError as e:
        print(f"bench_gt_slots: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(model_cfg, NUM_CLASSES).to(device).train()
    batch = synthetic_batch(args.batch_size, tuple(args.image_size), NUM_CLASSES, args.instances, device=device, seed=0)
    steps = {slots: (training_step(model, "fp32", device), padded_to(batch, slots)) for slots in args.slots}
    for step, padded in steps.values():
        step(padded)
    times: dict[int, list[tuple[float, float]]] = {slots: [] for slots in steps}
    for _ in range(args.iters):
        for slots, (step, padded) in steps.items():
            times[slots].append(timed_step(step, padded, device))
    first = args.slots[0]
    result = {"image_size": args.image_size, "batch_size": args.batch_size, "real_instances": batch.num_boxes.tolist(),
              "device": str(device), "variants": {}}
    for slots, samples in times.items():
        wall, cpu = (statistics.median(t) for t in zip(*samples))
        result["variants"][slots] = {"step_s": wall, "step_cpu_s": cpu}
    for slots, figures in result["variants"].items():
        base = result["variants"][first]
        print(f"{slots:4d} slots: {figures['step_s']:.3f} s/step ({figures['step_s'] / base['step_s']:.2f}x), "
              f"{figures['step_cpu_s']:.3f} CPU s/step ({figures['step_cpu_s'] / base['step_cpu_s']:.2f}x)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
