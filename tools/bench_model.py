"""Training-step time of our Mask R-CNN vs torchvision's maskrcnn_resnet50_fpn on one synthetic batch.

Examples:
    python tools/bench_model.py --image-size 512 640 --batch-size 2 --iters 3
    python tools/bench_model.py --image-size 512 640 --batch-size 2 --iters 2 --threads 1   # shared CPU machine
    python tools/bench_model.py --image-size 800 1344 --batch-size 8 --iters 20 --device cuda --json runs/bench_model.json

Prints median step seconds of each and ratio_vs_torchvision (ours / torchvision; below 1 is
faster). On CUDA it adds bf16 AMP for both and ours with the static part CUDA-graph captured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model.bench import run_model_benchmark
from train.config import ConfigError, load_config


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=[512, 640], help="padded image size")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument(
        "--config", type=Path, default=Path("configs/reference.yaml"), help="config whose model: section we build"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.backbone.depth=26")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (1 gives steadier figures on a shared machine)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.iters < 1 or args.batch_size < 1 or min(args.image_size) < 64:
        print("bench_model: --iters and --batch-size must be >= 1 and each image side >= 64", file=sys.stderr)
        return 2
    # As the trainer does (train/distributed.py configure_torch), before torch starts its threads:
    # denormal gradients otherwise dominate CPU step times, for both models.
    torch.set_flush_denormal(True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model_cfg = load_config(args.config, args.overrides).model
    except ConfigError as e:
        print(f"bench_model: {e}", file=sys.stderr)
        return 2
    result = run_model_benchmark(model_cfg, tuple(args.image_size), args.batch_size, args.iters, args.device)
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
