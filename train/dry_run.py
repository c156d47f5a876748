"""Throughput-only dry runs: is the GPU (or CPU) starved by the input pipeline?

    python train/main.py --config C --data SHARDS --dry-run pipeline|model|full|all --iters N [--report OUT.json]

- pipeline: the input pipeline alone, batches pulled as fast as it delivers them
  (tools/bench_pipeline.py, with its per-stage breakdown and, for DALI, the graph alone and the bare-DALI ceiling);
- model: the training step on one synthetic batch at the first bucket shape, no loading;
- full: the real training loop (loader + step), without evaluation or checkpoints.

Each runs warm-up iterations first (not timed), then `iters` timed ones, and reports
images/s and a per-stage breakdown (seconds per iteration). The images/s is the training
loop's: nothing waits for the device inside the timed steps (on CUDA they are timed between
two CUDA events), and the step is `train.engine.TrainingStep` itself. The breakdown is a
separate view over a few more steps, whose `lap` hook synchronizes the device at each stage
boundary so that GPU time lands in its stage (slower than the loop, so not its throughput).
`all` runs the three and ends with a verdict: the bottleneck, and the headroom = pipeline
images/s / model images/s (above 1: the pipeline keeps up with the model).
"""

from __future__ import annotations

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
from pipeline.coco_categories import coco_categories
from pipeline.shard_format import read_manifest
from train import components
from train.config import Config
from train.cuda_graphs import graph_static_part
from train.distributed import DistributedContext
from train.engine import TrainingStep, build_training_step, no_lap
from train.solver import set_learning_rate
from tools.bench_pipeline import run_pipeline_benchmark

log = logging.getLogger(__name__)

WARMUP_ITERS = 3
BREAKDOWN_ITERS = 3  # extra steps for the per-stage view (each synchronizes the device at every stage)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Seconds per named stage; `lap` syncs the device at each boundary so GPU time lands in its stage."""

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


def timed_seconds(run: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `run()`, which nothing inside waits for.

    On CUDA the wall time lies between two events recorded on the current stream around the
    work `run` queues (the host waits only at the end, as the training loop does).
    """
    cpu_start = time.process_time()
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start, time.process_time() - cpu_start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0, time.process_time() - cpu_start


def measure(
    name: str,
    step: Callable[[Callable[[str], None]], None],
    *,
    iters: int,
    images_per_iter: int,
    device: torch.device,
    warmup: int = WARMUP_ITERS,
    breakdown: int = BREAKDOWN_ITERS,
    replays: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """`step(lap)` `warmup` times untimed, `iters` times timed (images/s), then `breakdown` times
    with a synchronizing `lap` for the per-stage breakdown. With `replays` (a CUDA-graph replay
    count, such as `TrainingStep.graph_replays`) also the replays per step."""
    replays_before = replays() if replays else 0
    for _ in range(warmup):
        step(no_lap)

    def timed_steps() -> None:
        for _ in range(iters):
            step(no_lap)

    seconds, cpu_seconds = timed_seconds(timed_steps, device)
    clock = StageClock(device)
    clock.restart()
    for _ in range(breakdown):
        step(clock.lap)
    images = iters * images_per_iter
    result = {
        "images_per_s": images / seconds,
        "iters": iters,
        "images_per_iter": images_per_iter,
        "seconds": seconds,
        "cpu_ms_per_image": 1000.0 * cpu_seconds / images,
        "stages_s_per_iter": {stage: s / max(breakdown, 1) for stage, s in clock.seconds.items()},
    }
    if replays:
        result["graph_replays_per_step"] = (replays() - replays_before) / (warmup + iters + breakdown)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    stages = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["stages_s_per_iter"].items())
    log.info("dry run %-8s %8.2f images/s  (synchronized breakdown: %s per iteration)", name, result["images_per_s"], stages)
    return result


def _endless(loader: Any) -> Iterator[Any]:
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def trainer_step(cfg: Config, ctx: DistributedContext, categories: list[dict[str, Any]]) -> tuple[TrainingStep, str]:
    """The training step as main.py builds it (precision, fused optimizer, CUDA graphs per bucket), and how, for the log."""
    model = components.build_training_model(cfg, ctx.device, categories)
    model.train()
    step = build_training_step(cfg, ctx.device, model)
    set_learning_rate(step.optimizer, cfg.solver, cfg.solver.warmup_iters)  # post-warmup LR: the typical step
    graphs = graph_static_part(
        model, enabled=cfg.train.cuda_graphs, device=ctx.device, static_shapes=cfg.data.static_shapes,
        buckets=components.bucket_list(cfg.data),
        images_per_rank=components.per_rank_batch(cfg.solver.ims_per_batch, ctx.world_size, "solver.ims_per_batch"),
        autocast=step.autocast,
    )
    setup = f"{graphs}; {step.description}"
    log.info("%s", setup)
    return step, setup


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
    categories = manifest["categories"] if manifest else coco_categories()
    num_classes = len(categories) + 1
    max_gt = max(manifest["max_instances"], 1) if manifest else 16
    height, width = components.bucket_list(cfg.data)[0]  # the landscape bucket (or padded size)
    batch = synthetic_batch(images, (height, width), num_classes, max_gt, device=ctx.device, seed=cfg.seed)
    step, setup = trainer_step(cfg, ctx, categories)
    result = measure("model", lambda lap: step(batch, lap), iters=iters, images_per_iter=images, device=ctx.device,
                     replays=lambda: step.graph_replays)
    return {**result, "image_size": [height, width], "setup": setup}


def dry_run_full(cfg: Config, ctx: DistributedContext, iters: int) -> dict[str, Any]:
    loader = components.build_data_loader(cfg, ctx, training=True)
    batches = _endless(loader)
    step, setup = trainer_step(cfg, ctx, components.categories_of(cfg.data.train_shards))

    def next_batch(lap: Callable[[str], None]) -> Any:
        batch = next(batches)
        lap("data_wait")
        return batch

    images = cfg.solver.ims_per_batch // ctx.world_size
    result = measure("full", lambda lap: step(next_batch(lap), lap), iters=iters, images_per_iter=images,
                     device=ctx.device, replays=lambda: step.graph_replays)
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
