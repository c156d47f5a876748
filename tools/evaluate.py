"""Evaluate Mask R-CNN weights on val shards: COCO box and mask AP, the official way.

Inference runs through the same input pipeline as training (eval mode: no flip), batched,
on every rank; the detections are gathered on rank 0 and scored with COCOeval (pycocotools
by default, faster-coco-eval with --backend faster). Prints the usual COCO tables. The model
runs in the training precision, `train.precision` (auto: bf16 autocast on CUDA, fp32 on CPU).

    python tools/evaluate.py --weights runs/reference/checkpoints/ckpt-00090000.pt \\
        --data shards/val --annotations coco/annotations/instances_val2017.json --json runs/eval.json
    torchrun --nproc_per_node=8 tools/evaluate.py --weights maskrcnn_resnet50_fpn_coco.pth \\
        --data shards/val --annotations coco/annotations/instances_val2017.json \\
        --backend faster model.backbone.stride_in_1x1=false model.normalization=rgb model.rpn.anchor_generator=torchvision
    python tools/evaluate.py --config configs/demo.yaml --weights runs/demo/model.pt \\
        --data runs/demo/shards/val --annotations runs/demo/data/instances_val.json \\
        --results runs/demo/detections.json data.backend=torch

--weights takes a trainer checkpoint, this model's state dict, torchvision's COCO Mask R-CNN
or ResNet-50 state dicts, or Detectron's R-50.pkl. KEY=VALUE pairs override the config.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from model.weights import WeightsError
from pipeline.loader import build_loader
from pipeline.shard_format import ShardFormatError, read_manifest
from train.components import per_rank_batch
from train.config import ConfigError, load_config
from train.distributed import init_distributed, shutdown_distributed
from train.engine import autocast_context, resolve_precision
from train.evaluation import COCOEvaluator, EvaluationError, build_eval_model, coco_results, inference_on_dataset


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint or state dict to evaluate")
    parser.add_argument("--data", required=True, type=Path, help="val shard folder (tools/shard_coco.py --mode eval)")
    parser.add_argument("--annotations", required=True, type=Path, help="the instances JSON the shards were made from")
    parser.add_argument("--config", type=Path, default=Path("configs/reference.yaml"), help="model and data config")
    parser.add_argument("--backend", choices=("pycocotools", "faster"), help="COCOeval implementation (default: eval.backend)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    parser.add_argument("--json", type=Path, help="write the metrics (12 COCO stats per type) to this JSON file")
    parser.add_argument("--results", type=Path, help="write the detections as a COCO results JSON (tools/visualize.py reads it)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. eval.ims_per_batch=8")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        metrics = evaluate(args)
    except (EvaluationError, ConfigError, WeightsError, ShardFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if metrics is not None else 1


def evaluate(args: argparse.Namespace) -> dict | None:
    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(args.device)
    try:
        categories = read_manifest(args.data)["categories"]
        evaluator = COCOEvaluator.for_shards(
            args.annotations, args.data, backend=args.backend or cfg.eval.backend, num_workers=cfg.eval.num_workers
        )
        model = build_eval_model(cfg.model, args.weights, categories, ctx.device)
        loader = build_loader(
            cfg.data,
            args.data,
            training=False,
            batch_size=per_rank_batch(cfg.eval.ims_per_batch, ctx.world_size, "eval.ims_per_batch"),
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=cfg.seed,
            device=ctx.device,
        )
        with evaluator:
            precision = resolve_precision(cfg.train.precision, ctx.device)  # as training: bf16 on CUDA by default
            autocast = functools.partial(autocast_context, precision, ctx.device)
            metrics = inference_on_dataset(model, loader, evaluator, autocast=autocast)
            if ctx.is_main and args.results:
                _write_json(args.results, coco_results(evaluator.gathered))
        if ctx.is_main and args.json:
            _write_json(args.json, metrics)
        return metrics
    finally:
        shutdown_distributed()


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
