"""Throughput-only dry runs: is the GPU (or CPU) starved by the input pipeline?

    python train/main.py --config C --data SHARDS --dry-run pipeline|model|full|all --iters N [--report OUT.json]
        [--trace TRACE.json]

- pipeline: this rank's training loader alone, batches pulled as fast as it delivers them, with
  its per-stage breakdown (tools/bench_pipeline.py adds, for DALI, the graph alone and the
  bare-DALI ceiling, and the baselines);
- model: the training step on one synthetic batch at the first bucket shape, no loading;
- full: the real training loop (loader + step), without evaluation or checkpoints.

Each runs warm-up iterations first (not timed), then `iters` timed ones, and reports
images/s, a per-stage breakdown (seconds per iteration) and the timed steps' losses; it logs
every step as it goes. The model and full runs step at LR 0 (`hold_weights`): every kernel of
a real step runs, but random weights cannot diverge into NaN steps. A timed step with a
non-finite loss ends the run with one sentence, after the report is written.

The images/s is the training loop's: nothing waits for the device inside the timed steps (on
CUDA they are timed between two CUDA events), and the step is `train.engine.TrainingStep`
itself; the model run captures only the bucket it times. The breakdown is a
separate view over a few more steps, whose `lap` hook synchronizes the device at each stage
boundary so that GPU time lands in its stage (slower than the loop, so not its throughput);
the clocks are train/throughput.py's.
`all` runs the three and ends with a verdict: the bottleneck, and the headroom = pipeline
images/s / model images/s (above 1: the pipeline keeps up with the model).

`--trace TRACE.json` (`train.trace`) traces the timed iterations of each run (train/trace.py):
one Chrome trace file of them all, its first seconds drawn beside it (TRACE.png), and each
run's per-op table logged and in the report (`trace_ops`).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from model.build import build_model_with_weights
from model.synthetic_batch import synthetic_batch
from pipeline.coco_categories import coco_categories
from pipeline.loader import StageTimer
from pipeline.shard_format import read_manifest
from train import distributed, inputs
from train.config import Config
from train.cuda_graphs import graph_static_part
from train.distributed import DistributedContext
from train.engine import NonFiniteLossError, TrainingStep, build_training_step
from train.throughput import WARMUP_ITERS, endless, loader_epochs, loader_rate, measure
from train.trace import StepTracer, format_op_table, rank_path, timer_table, trace_document, write_trace

log = logging.getLogger(__name__)


def trainer_step(
    cfg: Config, ctx: DistributedContext, categories: list[dict[str, Any]], buckets: list[tuple[int, int]] | None = None
) -> tuple[TrainingStep, str]:
    """The training step as main.py builds it (precision, fused optimizer, CUDA graphs), at LR 0, and how, for the log.

    The static part is captured for `buckets` (default: every bucket the loader produces),
    so a run that times one bucket captures only that one.
    """
    start = time.perf_counter()
    log.info("building the model (%s weights) on %s", cfg.train.weights or "random", ctx.device)
    model = build_model_with_weights(cfg.model, categories, cfg.train.weights, ctx.device, for_training=True)
    model.train()
    step = build_training_step(cfg, ctx.device, model)
    hold_weights(step.optimizer)
    log.info("model built in %.1f s; capturing its static part where CUDA graphs apply", time.perf_counter() - start)
    graphs = graph_static_part(model, cfg, ctx, step.autocast, buckets)
    setup = f"{graphs}; {step.description}; LR 0 (weights held)"
    log.info("%s (%.1f s in all)", setup, time.perf_counter() - start)
    return step, setup


def hold_weights(optimizer: torch.optim.Optimizer) -> None:
    """LR 0 in every parameter group: the step still runs every kernel of a real one (gradients,
    momentum, weight decay and the fused update, which multiplies by the LR and skips nothing),
    but the weights stay as built.

    A throughput run times many steps of one batch, often from random weights: at the
    schedule's LR (0.02 x K after warm-up) the frozen-BN reference model turns to NaN within two
    steps, and every later step would time NaN arithmetic and report nothing usable.
    """
    for group in optimizer.param_groups:
        group["lr"] = 0.0


def dry_run_pipeline(cfg: Config, ctx: DistributedContext, iters: int, traces: DryRunTraces | None) -> dict[str, Any]:
    """This rank's training loader alone, batches pulled as fast as it delivers them."""
    loader = inputs.build_data_loader(cfg, ctx, training=True)
    result = loader_rate(loader, warmup=WARMUP_ITERS, iters=iters, device=ctx.device, trace=traces is not None)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stage_ms_per_image"].items() if v is not None)
    log.info("dry run pipeline %8.2f images/s  (%s ms per image)", result["images_per_s"], stages)
    if traces is not None:
        result["trace_ops"] = traces.add("pipeline", loader.timer, loader.timer.traced_images)
    return {**result, "backend": cfg.data.backend}


def dry_run_model(cfg: Config, ctx: DistributedContext, iters: int, traces: DryRunTraces | None) -> dict[str, Any]:
    images = cfg.solver.ims_per_batch // ctx.world_size
    manifest = read_manifest(Path(cfg.data.train_shards)) if cfg.data.train_shards else None
    categories = manifest["categories"] if manifest else coco_categories()
    num_classes = len(categories) + 1
    max_gt = max(manifest["max_instances"], 1) if manifest else 16
    height, width = inputs.bucket_list(cfg.data)[0]  # the landscape bucket (or padded size)
    batch = synthetic_batch(images, (height, width), num_classes, max_gt, device=ctx.device, seed=cfg.seed)
    step, setup = trainer_step(cfg, ctx, categories, buckets=[(height, width)])
    timer = StageTimer()  # no loader here: the step's phases only
    traced = StepTracer(timer)
    result = measure("model", lambda lap: traced(lambda phase_lap: step(batch, phase_lap), lap), iters=iters,
                     images_per_iter=images, device=ctx.device, replays=lambda: step.graph_replays,
                     trace=timer if traces is not None else None)
    if traces is not None:
        result["trace_ops"] = traces.add("model", timer, iters * images)
    return {**result, "image_size": [height, width], "setup": setup}


def dry_run_full(cfg: Config, ctx: DistributedContext, iters: int, traces: DryRunTraces | None) -> dict[str, Any]:
    loader = inputs.build_data_loader(cfg, ctx, training=True)
    batches = endless(loader_epochs(loader))
    step, setup = trainer_step(cfg, ctx, inputs.categories_of(cfg.data.train_shards))

    def next_batch(lap: Callable[[str], None]) -> Any:
        batch = next(batches)
        lap("data_wait")
        return batch

    images = cfg.solver.ims_per_batch // ctx.world_size
    traced = StepTracer(loader.timer)  # the step's phases on the loader's timer: one trace of both
    result = measure("full", lambda lap: traced(lambda phase_lap: step(next_batch(phase_lap), phase_lap), lap),
                     iters=iters, images_per_iter=images, device=ctx.device, replays=lambda: step.graph_replays,
                     trace=loader.timer if traces is not None else None)
    if traces is not None:
        result["trace_ops"] = traces.add("full", loader.timer, iters * images)
    return {**result, "setup": setup}


class DryRunTraces:
    """The timers each dry run traced, for one trace file at the end; each run's per-op table as it is added."""

    def __init__(self, path: Path, device: torch.device):
        self.path = path
        self.device = device
        self.timers: list[StageTimer] = []
        self.images = 0

    def add(self, name: str, timer: StageTimer, images: int) -> list[dict[str, Any]]:
        self.timers.append(timer)
        self.images += images
        rows = timer_table(timer, images, self.device)
        log.info("dry run %s, traced:\n%s", name, format_op_table(rows, images))
        return rows

    def write(self) -> None:
        write_trace(trace_document(self.timers, device=self.device, images=self.images), self.path)


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
    distributed.configure_torch(cfg.train, cfg.seed, ctx.rank)
    names = list(RUNNERS) if which == "all" else [which]
    results: dict[str, Any] = {}
    traces = None
    if cfg.train.trace:
        traces = DryRunTraces(rank_path(cfg.train.trace, ctx.rank, ctx.world_size), ctx.device)
    for name in names:
        results[name] = RUNNERS[name](cfg, ctx, iters, traces)
        gc.collect()  # release the run's loader (and its DALI threads) before the next one
    if which == "all":
        results["verdict"] = verdict(results["pipeline"], results["model"])
        log.info("verdict: %s", results["verdict"]["text"])
    results["device"] = str(ctx.device)
    results["world_size"] = ctx.world_size
    if traces is not None:
        traces.write()
        results["trace"] = str(traces.path)
    if report and ctx.is_main:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(results, indent=2))
        log.info("dry-run report written to %s", report)
    nonfinite = {name: results[name]["nonfinite_steps"] for name in names if not results[name].get("losses_finite", True)}
    if nonfinite:
        kept = f"its figures are in {report}" if report else "pass --report OUT.json to keep its figures"
        raise NonFiniteLossError(
            f"the dry run timed steps with non-finite losses ({', '.join(f'{n}: steps {s}' for n, s in nonfinite.items())}); "
            f"{kept}; at LR 0 the weights never change, so the batch, the weights file (train.weights) or fp16's range "
            "made them so: check the shards with tools/shard_coco.py --verify, or run with train.precision=bf16"
        )
    return results
