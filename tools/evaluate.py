"""Evaluate Mask R-CNN weights on val shards: COCO box and mask AP, the official way.

Inference runs through the same input pipeline as training (eval mode: no flip), batched,
on every rank; the detections are gathered on rank 0 and scored with COCOeval (pycocotools
by default, faster-coco-eval with --backend faster). Prints the usual COCO tables. The model
runs in the training precision, `train.precision` (auto: bf16 autocast on CUDA, fp32 on CPU).

    python tools/evaluate.py --weights runs/reference/checkpoints/ckpt-00090000.pt \\
        --data shards/val --annotations coco/annotations/instances_val2017.json --json runs/eval.json
    torchrun --nproc_per_node=8 tools/evaluate.py --weights maskrcnn_resnet50_fpn_coco.pth \\
        --data shards/val --annotations coco/annotations/instances_val2017.json --backend faster
    python tools/evaluate.py --weights runs/demo/checkpoints/ckpt-00000138.pt \\
        --data runs/demo/shards/val --annotations runs/demo/data/instances_val.json \\
        --results runs/demo/detections.json data.backend=torch

--weights takes a trainer checkpoint, this model's state dict, or torchvision's COCO Mask R-CNN.
The model config comes from the checkpoint (trainer checkpoints carry theirs); --config and
KEY=VALUE overrides apply on top. Files without a config take configs/reference.yaml and what
the weights need (torchvision's: RGB normalization, stride in the 3x3 conv, its anchors). Besides
COCO's tables it prints each category's box and mask AP (AP@[.5:.95]; "-" for a category without
ground truth), and --json holds them too (`per_class`). The --json and
--results paths are checked before the evaluation starts; if writing still fails at the end,
the metrics have been printed first. Errors end in one sentence, exit code 2; Ctrl-C or SIGTERM
ends in one sentence too (exit code 130 or 143; an evaluation is not resumed, it is run again).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING, Any

from train.config import ConfigError
from train.config_schema import EVAL_BACKENDS as BACKENDS
from train.output_paths import OutputPathError, check_outputs_apart

if TYPE_CHECKING:
    from train.interrupts import SignalStop


class OutputError(OSError):
    """An output file that cannot be written; the message says which, and that the metrics were printed."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint or state dict to evaluate")
    parser.add_argument("--data", required=True, type=Path, help="val shard folder (tools/shard_coco.py --mode eval)")
    parser.add_argument("--annotations", required=True, type=Path, help="the instances JSON the shards were made from")
    parser.add_argument("--config", type=Path, help="model and data config (default: the one saved in the checkpoint)")
    parser.add_argument("--backend", choices=BACKENDS, help="COCOeval implementation (default: eval.backend)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    parser.add_argument("--json", type=Path, help="write the metrics (12 COCO stats per type) to this JSON file")
    parser.add_argument("--results", type=Path, help="write the detections as a COCO results JSON (tools/visualize.py reads it)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. eval.ims_per_batch=8")
    return parser


def main(args: argparse.Namespace) -> int:
    from model.weights import WeightsError  # the heavy imports, after the command line is parsed
    from pipeline.shard_format import ShardFormatError
    from train.evaluation import EvaluationError
    from train.interrupts import Interrupted, signals_interrupt

    try:
        with signals_interrupt() as stop:
            evaluate(args, stop)
    except (EvaluationError, ConfigError, WeightsError, ShardFormatError, OutputError, OutputPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # metrics of part of the set are not COCO's: nothing to keep
        print(stop.sentence("run the same command again"), file=sys.stderr)
        return stop.exit_code
    return 0


def evaluate(args: argparse.Namespace, stop: SignalStop | None = None) -> dict:
    check_outputs_apart(
        {"--json": args.json, "--results": args.results},
        {"--weights": args.weights, "--data": args.data, "--annotations": args.annotations, "--config": args.config},
    )
    from model.build import build_model_with_weights
    from model.weights import read_weights
    from pipeline.loader import build_loader
    from pipeline.shard_format import read_manifest
    from train.distributed import init_distributed, per_rank_batch, shutdown_distributed
    from train.engine import autocast_context, resolve_precision
    from train.evaluation import COCOEvaluator, coco_results, inference_on_dataset
    from train.inference import config_for_weights

    weights = read_weights(args.weights)
    cfg = config_for_weights(weights, args.config, args.overrides)
    ctx = init_distributed(args.device)
    try:
        outputs = {flag: path for flag, path in (("--json", args.json), ("--results", args.results)) if path}
        if ctx.is_main:
            for flag, path in outputs.items():
                check_writable(path, flag)  # before the long part: a typo costs nothing
        categories = read_manifest(args.data)["categories"]
        evaluator = COCOEvaluator.for_shards(
            args.annotations, args.data, backend=args.backend or cfg.eval.backend, num_workers=cfg.eval.num_workers,
            scoring_workers=cfg.eval.scoring_workers,
        )
        model = build_model_with_weights(cfg.model, categories, weights, ctx.device)
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
            batches = stop.each(loader) if stop else loader
            metrics = inference_on_dataset(model, batches, evaluator, autocast=autocast)
            detections = coco_results(evaluator.gathered) if ctx.is_main and args.results else None
        if ctx.is_main:
            metrics = {**metrics, "per_class": per_class(evaluator.per_category)}
            print(per_class_table(metrics["per_class"]))
            print(f"box AP {metrics['bbox']['AP']:.4f}, mask AP {metrics['segm']['AP']:.4f}")
            for path, value in ((args.json, metrics), (args.results, detections)):
                if path:
                    write_output(path, value)
        return metrics
    finally:
        shutdown_distributed()


def per_class(per_category: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per category: its id, name, box AP and mask AP (None without ground truth)."""
    return [
        {"category_id": box["category_id"], "name": box["name"], "box_AP": box["AP"], "mask_AP": mask["AP"]}
        for box, mask in zip(per_category["bbox"], per_category["segm"])
    ]


def per_class_table(rows: list[dict[str, Any]]) -> str:
    """The per-class rows as a plain table, AP@[.5:.95] in percent."""
    width = max([len("category"), *(len(r["name"]) for r in rows)])
    lines = ["per-class AP (AP@[.5:.95], %):", f"  {'category':<{width}}  {'box':>5}  {'mask':>5}"]
    lines += [f"  {r['name']:<{width}}  {_percent(r['box_AP']):>5}  {_percent(r['mask_AP']):>5}" for r in rows]
    return "\n".join(lines)


def _percent(ap: float | None) -> str:
    return "-" if ap is None else f"{100 * ap:.1f}"


def check_writable(path: Path, flag: str) -> None:
    """`path` can be created or replaced: its folder exists or can be made, and takes a file."""
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; pass a file path such as {path / 'eval.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {path} cannot be written ({e.strerror or e}); pass a path in a folder you can write to") from None


def write_output(path: Path, value: object) -> None:
    try:
        path.write_text(json.dumps(value, indent=1) + "\n")
    except OSError as e:
        raise OutputError(
            f"{path} could not be written ({e.strerror or e}); the metrics were printed above, so nothing needs rerunning "
            "but writing the file: free space or fix the folder and pass --json/--results again"
        ) from None


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
