"""Training-step time of our Mask R-CNN against torchvision's `maskrcnn_resnet50_fpn`, same batch, same process.

Both models are the benchmark's configuration: ResNet-50-FPN, FrozenBatchNorm, stem and res2
frozen, 81 classes, random weights (speed does not depend on them). torchvision gets the
same images (its transform set to keep their size) and the same boxes; it needs full-image
masks, for which it gets the boxes filled (its cost does not depend on mask content). Steps
alternate between the two models, and the median step time of each is reported (on CPU
also the median process CPU time, which a busy shared machine disturbs less).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

import torch
import torchvision
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from model.build import build_model
from model.maskrcnn import MaskRCNN
from model.synthetic_batch import synthetic_batch
from pipeline.batch import Batch

NUM_CLASSES = 81
MAX_GT = 8


def torchvision_maskrcnn(image_size: tuple[int, int]) -> torch.nn.Module:
    """torchvision's maskrcnn_resnet50_fpn as built on a pretrained backbone (frozen BN, 3 trainable stages)."""
    backbone = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(backbone, trainable_layers=3)  # what maskrcnn_resnet50_fpn calls
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


def _timed(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _training_step(model: torch.nn.Module, inputs: tuple, amp_dtype: torch.dtype | None) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    device_type = next(model.parameters()).device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(*inputs)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def capture_static_part(model: MaskRCNN, batch: Batch, amp_dtype: torch.dtype | None) -> None:
    """Capture the static part for this image shape, as the trainer does (it replays in training mode)."""
    with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None, cache_enabled=False):
        model.static_part.capture(batch.images, batch.image_sizes)


def run_model_benchmark(
    model_cfg: Mapping[str, Any],
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
    theirs = torchvision_maskrcnn(image_size).to(device).train()
    batch = synthetic_batch(batch_size, image_size, NUM_CLASSES, MAX_GT, device=device, seed=0)
    their_inputs = torchvision_inputs(batch)
    variants: dict[str, tuple[Callable, Callable]] = {
        "": (_training_step(ours, (batch,), None), _training_step(theirs, their_inputs, None))
    }
    if device.type == "cuda":
        variants["amp_"] = (
            _training_step(ours, (batch,), torch.bfloat16),
            _training_step(theirs, their_inputs, torch.bfloat16),
        )
    result: dict[str, Any] = {
        "image_size": list(image_size),
        "batch_size": batch_size,
        "iters": iters,
        "device": str(device),
    }
    for prefix, (ours_step, their_step) in variants.items():
        for _ in range(warmup):
            ours_step(), their_step()
        ours_times, their_times = [], []
        for _ in range(iters):
            ours_times.append(_timed(ours_step, device))
            their_times.append(_timed(their_step, device))
        ours_wall, ours_cpu = (statistics.median(t) for t in zip(*ours_times))
        their_wall, their_cpu = (statistics.median(t) for t in zip(*their_times))
        result[f"ours_{prefix}step_s"] = ours_wall
        result[f"torchvision_{prefix}step_s"] = their_wall
        result[f"ratio_{prefix}vs_torchvision"] = ours_wall / their_wall
        if device.type == "cpu":  # CPU seconds: steadier than wall time on a shared machine
            result["ours_step_cpu_s"], result["torchvision_step_cpu_s"] = ours_cpu, their_cpu
            result["ratio_cpu_vs_torchvision"] = ours_cpu / their_cpu
    if device.type == "cuda":
        capture_static_part(ours, batch, torch.bfloat16)
        graphed_step = _training_step(ours, (batch,), torch.bfloat16)
        for _ in range(warmup):
            graphed_step()
        times = [_timed(graphed_step, device)[0] for _ in range(iters)]
        result["ours_amp_graphed_step_s"] = statistics.median(times)
        result["ratio_amp_graphed_vs_torchvision"] = result["ours_amp_graphed_step_s"] / result["torchvision_amp_step_s"]
    return result
