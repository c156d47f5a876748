"""Throughput-only dry run of the input pipeline: images/s, per-stage times, and baselines.

    python tools/bench_pipeline.py --data SHARDS --batch-size 8 --iters 20
    python tools/bench_pipeline.py --data SHARDS --batch-size 8 --iters 20 --backend torch
    python tools/bench_pipeline.py --data SHARDS --batch-size 8 --iters 20 \\
        --baseline-images coco/train2017 --baseline-annotations coco/instances_train2017.json \\
        --json runs/bench_pipeline.json data.num_threads=2

Runs the pipeline alone (no model) after a warm-up. With DALI it also times a bare DALI
decode -> flip -> resize pipeline on the same shards; with --baseline-images/--baseline-annotations
(the COCO folder and JSON the shards were made from) it also times torchvision's
reference-style loader, and prints our rate over each baseline's. KEY=VALUE pairs override the
config (sizes, data.num_threads, data.decode_device, ...). `--json` writes every figure; key
`images_per_s` holds the selected backend's rate. For steady-state figures keep --warmup plus
--iters within one epoch (the report prints the batches per epoch): each epoch starts fresh
pipelines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.bench import run_pipeline_benchmark
from pipeline.shard_format import ShardFormatError
from train.config import ConfigError, load_config


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="shard folder written by tools/shard_coco.py")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--iters", type=int, default=20, help="batches measured after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="batches pulled before measuring")
    parser.add_argument("--backend", choices=["dali", "torch"], default=None, help="default: data.backend of the config")
    parser.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda")
    parser.add_argument("--config", type=Path, default=Path("configs/reference.yaml"), help="config file")
    parser.add_argument("--baseline-images", type=Path, help="COCO image folder for the torchvision baseline")
    parser.add_argument("--baseline-annotations", type=Path, help="COCO instances JSON for the torchvision baseline")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.num_threads=2")
    return parser


def print_report(result: dict) -> None:
    print(f"{result['backend']}: {result['images_per_s']:.1f} images/s, {result['cpu_ms_per_image']:.1f} CPU ms/image in this process "
          f"(batch {result['batch_size']}, {result['num_threads']} threads, sizes {result['min_size']}/{result['max_size']})")
    for stage, ms in result["stage_ms_per_image"].items():
        print(f"  {stage:8s} {'inside DALI' if ms is None else f'{ms:8.2f} ms/image'}")
    for name, figures in result["baselines"].items():
        if "images_per_s" in figures:
            cpu = f", {figures['cpu_ms_per_image']:.1f} CPU ms/image" if "cpu_ms_per_image" in figures else ""
            print(f"baseline {name}: {figures['images_per_s']:.1f} images/s{cpu}")
    for name, ratio in result["ratios"].items():
        print(f"ratio {name}: {ratio:.2f}x")
    if result["warmup"] + result["iters"] > result["batches_per_epoch"]:
        print(f"note: the measurement crossed an epoch start ({result['batches_per_epoch']} batches per epoch)")
    machine = result["machine"]
    print(f"machine: {machine['cpus']} CPUs, load average {machine['loadavg_before'][0]:.1f} -> {machine['loadavg_after'][0]:.1f}")


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        print("bench_pipeline: --batch-size and --iters must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if bool(args.baseline_images) != bool(args.baseline_annotations):
        print("bench_pipeline: pass both --baseline-images and --baseline-annotations, or neither", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_pipeline_benchmark(
            cfg.data,
            args.data,
            batch_size=args.batch_size,
            iters=args.iters,
            backend=args.backend,
            warmup=args.warmup,
            device=args.device,
            baseline_images=args.baseline_images,
            baseline_annotations=args.baseline_annotations,
        )
    except (ConfigError, ShardFormatError, ValueError) as e:
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 2
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
