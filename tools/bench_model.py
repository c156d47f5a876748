"""Training-step time of our Mask R-CNN against torchvision's `maskrcnn_resnet50_fpn`, same batch, same process.

Examples:
    python tools/bench_model.py --image-size 512 640 --batch-size 2 --iters 3
    python tools/bench_model.py --image-size 512 640 --batch-size 2 --iters 2 --threads 1   # shared CPU machine
    python tools/bench_model.py --image-size 800 1344 --batch-size 8 --iters 20 --device cuda --json runs/bench_model.json

Prints median step seconds of each and ratio_vs_torchvision (ours / torchvision; below 1 is
faster). On CUDA it adds bf16 AMP for both and ours with the static part CUDA-graph captured.

Both models are the benchmark's configuration: ResNet-50-FPN, FrozenBatchNorm, stem and res2
frozen, 81 classes, random weights (speed does not depend on them) at learning rate 0: every
kernel of a real step runs, the weights never move, so every timed step is the same finite step
(random weights at a real learning rate diverge to NaN within a few steps; the dry runs do the
same, train/dry_run.py). Each model's timed losses are checked finite and reported
(`*_losses_finite`). torchvision gets the
same images (its transform set to keep their size) and the same boxes; it needs full-image
masks, for which it gets the boxes filled (its cost does not depend on mask content). Both
run the trainer's own step (`train.engine.TrainingStep`) with the same SGD. Steps alternate
between the two models, and the median step time of each is reported (on CPU also the
median process CPU time, which a busy shared machine disturbs less).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from model.build import build_model
from model.synthetic_batch import synthetic_batch
from pipeline.batch import Batch
from tools import write_json
from train.config import Config, ConfigError, load_config
from train.engine import TrainingStep, step_autocast
from train.throughput import synchronize, timed_seconds

NUM_CLASSES = 81
MAX_GT = 8


def torchvision_maskrcnn(image_size: tuple[int, int]) -> nn.Module:
    """torchvision's maskrcnn_resnet50_fpn as built on a pretrained backbone (frozen BN, 3 trainable stages)."""
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    return torchvision.models.detection.MaskRCNN(
        backbone, num_classes=NUM_CLASSES, min_size=min(image_size), max_size=max(image_size)
    )


def torchvision_inputs(batch: Batch) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    h, w = batch.images.shape[-2:]
    images, targets = [], []
    for i in range(len(batch)):
        n = int(batch.num_boxes[i])
        boxes = batch.boxes[i, :n]
        ys = torch.arange(h, device=boxes.device)[None, :, None] + 0.5
        xs = torch.arange(w, device=boxes.device)[None, None, :] + 0.5
        b = boxes[:, :, None, None]
        masks = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
        images.append(batch.images[i].float().div(255).contiguous())  # torchvision normalizes 0-1 RGB itself
        targets.append({"boxes": boxes, "labels": batch.labels[i, :n], "masks": masks.to(torch.uint8)})
    return images, targets


class Unpacked(nn.Module):
    """torchvision's detection model takes (images, targets); the training step hands it one batch: that pair."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: tuple[Any, Any]) -> dict[str, torch.Tensor]:
        return self.model(*inputs)


def training_step(model: nn.Module, precision: str, device: torch.device, *, cuda_graphs: bool = False) -> TrainingStep:
    """The trainer's step on `model` with plain SGD (learning rate 0) over its trainable parameters."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
    return TrainingStep(model, optimizer, None, step_autocast(precision, device, cuda_graphs=cuda_graphs), device)


def timed_step(step: TrainingStep, batch: Any, device: torch.device) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(wall seconds, process CPU seconds, losses still on the device) of one step, after the work queued before it."""
    synchronize(device)
    losses: dict[str, torch.Tensor] = {}
    wall, cpu = timed_seconds(lambda: losses.update(step(batch)), device)
    return wall, cpu, losses


def all_finite(steps: list[tuple[float, float, dict[str, torch.Tensor]]]) -> bool:
    """Whether every loss of every timed step is finite (read after the clock has stopped)."""
    return all(bool(torch.isfinite(loss).all()) for _, _, losses in steps for loss in losses.values())


def run_model_benchmark(
    model_cfg: Config,
    image_size: tuple[int, int],
    batch_size: int,
    iters: int,
    device: str | torch.device = "cpu",
    warmup: int = 1,
) -> dict[str, Any]:
    """Median training-step seconds of ours (built from `model_cfg`, 81 classes) and torchvision's,
    and their ratio (ours / torchvision). On CUDA also bf16 AMP for both, and ours with the
    static part captured as a CUDA graph.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    ours = build_model(model_cfg, NUM_CLASSES).to(device).train()
    theirs = Unpacked(torchvision_maskrcnn(image_size)).to(device).train()
    batch = synthetic_batch(batch_size, image_size, NUM_CLASSES, MAX_GT, device=device, seed=0)
    their_batch = torchvision_inputs(batch)
    precisions = {"": "fp32", "amp_": "bf16"} if device.type == "cuda" else {"": "fp32"}
    result: dict[str, Any] = {
        "image_size": list(image_size),
        "batch_size": batch_size,
        "iters": iters,
        "device": str(device),
    }
    for prefix, precision in precisions.items():
        ours_step, their_step = training_step(ours, precision, device), training_step(theirs, precision, device)
        for _ in range(warmup):
            ours_step(batch), their_step(their_batch)
        ours_times, their_times = [], []
        for _ in range(iters):
            ours_times.append(timed_step(ours_step, batch, device))
            their_times.append(timed_step(their_step, their_batch, device))
        ours_wall, ours_cpu = (statistics.median(t) for t in list(zip(*ours_times))[:2])
        their_wall, their_cpu = (statistics.median(t) for t in list(zip(*their_times))[:2])
        result[f"ours_{prefix}losses_finite"] = all_finite(ours_times)
        result[f"torchvision_{prefix}losses_finite"] = all_finite(their_times)
        result[f"ours_{prefix}step_s"] = ours_wall
        result[f"torchvision_{prefix}step_s"] = their_wall
        result[f"ratio_{prefix}vs_torchvision"] = ours_wall / their_wall
        if device.type == "cpu":  # CPU seconds: steadier than wall time on a shared machine
            result["ours_step_cpu_s"], result["torchvision_step_cpu_s"] = ours_cpu, their_cpu
            result["ratio_cpu_vs_torchvision"] = ours_cpu / their_cpu
    if device.type == "cuda":
        graphed_step = training_step(ours, "bf16", device, cuda_graphs=True)
        ours.static_part.capture([tuple(batch.images.shape[-2:])], len(batch), graphed_step.autocast)  # as the trainer does
        for _ in range(warmup):
            graphed_step(batch)
        times = [timed_step(graphed_step, batch, device) for _ in range(iters)]
        result["ours_amp_graphed_step_s"] = statistics.median(wall for wall, _, _ in times)
        result["ours_amp_graphed_losses_finite"] = all_finite(times)
        result["ratio_amp_graphed_vs_torchvision"] = result["ours_amp_graphed_step_s"] / result["torchvision_amp_step_s"]
    return result


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
    write_json(args.json, result)
    nonfinite = [key for key, value in result.items() if key.endswith("losses_finite") and not value]
    if nonfinite:
        print(f"bench_model: the timed steps had non-finite losses ({', '.join(nonfinite)}); "
              "the times above are of those steps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
