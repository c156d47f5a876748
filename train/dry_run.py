"""Throughput-only dry runs: is the GPU (or CPU) starved by the input pipeline?

    python train/main.py --config C --data SHARDS --dry-run pipeline|model|full|all --iters N [--report OUT.json]

- pipeline: the input pipeline alone, batches pulled as fast as it delivers them
  (tools/bench_pipeline.py, with its per-stage breakdown and, for DALI, the graph alone and the bare-DALI ceiling);
- model: the training step on one synthetic batch at the first bucket shape, no loading;
- full: the real training loop (loader + step), without evaluation or checkpoints.

Each runs warm-up iterations first (not timed), then `iters` timed ones, and reports
images/s and a per-stage breakdown (seconds per iteration). `all` runs the three and ends
with a verdict: the bottleneck, and the headroom = pipeline images/s / model images/s
(above 1: the pipeline keeps up with the model).
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from model.synthetic import synthetic_batch
from pipeline.shard_format import read_manifest
from train import components
from train.config import Config
from train.cuda_graphs import graph_static_part
from train.distributed import DistributedContext
from train.engine import autocast_context, make_grad_scaler, resolve_precision
from train.solver import build_optimizer, set_learning_rate
from tools.bench_pipeline import run_pipeline_benchmark

log = logging.getLogger(__name__)

WARMUP_ITERS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Seconds per named stage; syncs the device at each boundary so GPU time lands in its stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now

    def restart(self) -> None:
        _sync(self.device)
        self.seconds.clear()
        self._last = time.perf_counter()


def measure(name: str, step: Callable[[StageClock], None], *, iters: int, images_per_iter: int, device: torch.device) -> dict[str, Any]:
    """Run `step` WARMUP_ITERS times untimed, then `iters` times; images/s and stage breakdown."""
    clock = StageClock(device)
    for _ in range(WARMUP_ITERS):
        step(clock)
    clock.restart()
    start = time.perf_counter()
    for _ in range(iters):
        step(clock)
    elapsed = time.perf_counter() - start
    result = {
        "images_per_s": iters * images_per_iter / elapsed,
        "iters": iters,
        "images_per_iter": images_per_iter,
        "seconds": elapsed,
        "stages_s_per_iter": {stage: s / iters for stage, s in clock.seconds.items()},
    }
    stages = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["stages_s_per_iter"].items())
    log.info("dry run %-8s %8.2f images/s  (%s per iteration)", name, result["images_per_s"], stages)
    return result


def _endless(loader: Any) -> Iterator[Any]:
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def _training_step(model, optimizer, scaler, autocast) -> Callable[[StageClock, Any], None]:
    """The engine's step, split into timed stages (forward, backward, optimizer)."""

    def step(clock: StageClock, batch: Any) -> None:
        with autocast():
            losses = model(batch)
        total = sum(losses.values())
        clock.lap("forward")
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(total) if scaler else total).backward()
        clock.lap("backward")
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        clock.lap("optimizer")

    return step


def _model_parts(cfg: Config, ctx: DistributedContext, num_classes: int) -> tuple[Callable[[StageClock, Any], None], str]:
    """The training step as main.py builds it (precision, CUDA graphs per bucket); no DDP, no data."""
    model = components.build_training_model(cfg, ctx.device, num_classes)
    model.train()
    optimizer, _ = build_optimizer(model, cfg.solver, ctx.device)
    set_learning_rate(optimizer, cfg.solver, cfg.solver.warmup_iters)  # post-warmup LR: the typical step
    precision = resolve_precision(cfg.train.precision, ctx.device)
    autocast = functools.partial(autocast_context, precision, ctx.device, not cfg.train.cuda_graphs)
    graphs = graph_static_part(
        model, enabled=cfg.train.cuda_graphs, device=ctx.device, static_shapes=cfg.data.static_shapes,
        buckets=components.bucket_list(cfg.data),
        images_per_rank=components.per_rank_batch(cfg.solver.ims_per_batch, ctx.world_size, "solver.ims_per_batch"),
        autocast=autocast,
    )
    log.info("%s; precision %s", graphs, precision)
    return _training_step(model, optimizer, make_grad_scaler(precision, ctx.device), autocast), f"{graphs}; precision {precision}"


def dry_run_pipeline(cfg: Config, ctx: DistributedContext, iters: int) -> dict[str, Any]:
    """The pipeline's own benchmark (tools/bench_pipeline.py) on this rank's share of the batch."""
    result = run_pipeline_benchmark(
        cfg.data,
        components.require_shards(cfg.data.train_shards, "data.train_shards (--data)"),
        batch_size=components.per_rank_batch(cfg.solver.ims_per_batch, ctx.world_size, "solver.ims_per_batch"),
        iters=iters,
        warmup=WARMUP_ITERS,
        device=ctx.device,
    )
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stage_ms_per_image"].items() if v is not None)
    log.info("dry run pipeline %8.2f images/s  (%s ms per image)", result["images_per_s"], stages)
    return result


def dry_run_model(cfg: Config, ctx: DistributedContext, iters: int) -> dict[str, Any]:
    images = cfg.solver.ims_per_batch // ctx.world_size
    manifest = read_manifest(Path(cfg.data.train_shards)) if cfg.data.train_shards else None
    num_classes = len(manifest["categories"]) + 1 if manifest else cfg.model.num_classes
    max_gt = max(manifest["max_instances"], 1) if manifest else 16
    height, width = components.bucket_list(cfg.data)[0]  # the landscape bucket (or padded size)
    batch = synthetic_batch(images, (height, width), num_classes, max_gt, device=ctx.device, seed=cfg.seed)
    train_step, setup = _model_parts(cfg, ctx, num_classes)
    result = measure("model", lambda clock: train_step(clock, batch), iters=iters, images_per_iter=images, device=ctx.device)
    return {**result, "image_size": [height, width], "setup": setup}


def dry_run_full(cfg: Config, ctx: DistributedContext, iters: int) -> dict[str, Any]:
    loader = components.build_data_loader(cfg, ctx, training=True)
    batches = _endless(loader)
    train_step, setup = _model_parts(cfg, ctx, components.num_classes_of(cfg.data.train_shards))

    def step(clock: StageClock) -> None:
        batch = next(batches)
        clock.lap("data_wait")
        train_step(clock, batch)

    result = measure("full", step, iters=iters, images_per_iter=cfg.solver.ims_per_batch // ctx.world_size, device=ctx.device)
    return {**result, "setup": setup}


def verdict(pipeline: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """Which part limits training, and by how much the pipeline out-runs the model."""
    headroom = pipeline["images_per_s"] / model["images_per_s"]
    bottleneck = "model" if headroom >= 1 else "pipeline"
    if bottleneck == "model":
        text = f"the model is the bottleneck: the pipeline delivers {headroom:.2f}x what the training step consumes"
    else:
        text = f"the input pipeline is the bottleneck: it delivers only {headroom:.2f}x of what the training step could consume"
    return {"bottleneck": bottleneck, "headroom": headroom, "text": text}


# The model first: a loader left from an earlier run could still hold threads that compete with it.
RUNNERS = {"model": dry_run_model, "pipeline": dry_run_pipeline, "full": dry_run_full}


def run_dry_runs(which: str, cfg: Config, ctx: DistributedContext, *, iters: int, report: str | None) -> dict[str, Any]:
    """Run one dry run (or `all`), print the figures, write `report` as JSON on rank 0."""
    components.configure_torch(cfg.train, cfg.seed, ctx.rank)
    names = list(RUNNERS) if which == "all" else [which]
    results: dict[str, Any] = {}
    for name in names:
        results[name] = RUNNERS[name](cfg, ctx, iters)
        gc.collect()  # release the run's loader (and its DALI threads) before the next one
    if which == "all":
        results["verdict"] = verdict(results["pipeline"], results["model"])
        log.info("verdict: %s", results["verdict"]["text"])
    results["device"] = str(ctx.device)
    results["world_size"] = ctx.world_size
    if report and ctx.is_main:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(results, indent=2))
        log.info("dry-run report written to %s", report)
    return results
