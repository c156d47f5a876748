"""The prepared GPU check: every figure the first GPU window should bring back, from one command.

    tools/gpu_check.sh --fetch-wheels .whl      # here, where pip reaches the registry: the wheels the GPU machine lacks
    tools/gpu_check.sh OUT_DIR .whl             # on the GPU machine: torch, no network, no DALI
    tools/gpu_check.sh --rehearse OUT_DIR       # here: every stage on the CPU at small sizes, DALI hidden
    tools/gpu_check.sh OUT_DIR .whl --only no_host_sync,gpu_tests    # a rerun of some stages

The stages run in the order of STAGES. Consecutive stages of one process run in one process:
the four graphed bf16 stages share one model and one capture (of the one bucket they time),
the two eager stages share a process; every other stage has its own. Each stage has its own
time limit, counted from the end of the stage before it in its process (from the process's
start for the first), inside a total budget. A failed check (`CheckFailed`) keeps its figures
and the process goes on; a stage that breaks, hangs or takes the CUDA context down costs only
itself: its process ends there and the stages after it start in a fresh one. A stage that no longer fits the budget is recorded as skipped. cuDNN autotunes
only in processes that time training steps. After every stage OUT_DIR/gpu_check.json is
rewritten:

    {"mode": "gpu" | "rehearsal", "stages": {NAME: {"status": "ok" | "failed" | "timeout" | "skipped",
     "seconds": ..., "process": ..., "figures": {...}}}, "goals": {...}}

and the stage processes' output is appended to OUT_DIR/gpu_check.log: two files in all (8
may come back). The training figures come from
the trainer's own step (`train.engine.TrainingStep`, built as train/main.py builds it, at LR 0:
train/dry_run.py `hold_weights`) timed between CUDA events (train/throughput.py), with every
timed step's losses read back afterwards and checked finite. The rehearsal runs the reference
model (ResNet-50-FPN, frozen BN, stem and res2 frozen, the same LR code) at a quarter of its
width on 64x96 images, so the steps that would diverge on the GPU diverge here too.
docs/PERFORMANCE.md lists the stages, their figures, the goals and the time estimate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from pipeline.batch import Batch
    from train.config import Config
    from train.distributed import DistributedContext
    from train.engine import TrainingStep

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project is not installed there

# Each stage imports what it uses inside its function: a stage process starts in seconds, and
# the driver imports neither torch nor the project (`--help` works in any Python 3).

RESULTS = "gpu_check.json"
LOG = "gpu_check.log"
DEFAULT_BUDGET_S = 420  # the whole check; one device command may take 600 s, the wheels' install and the start included
MIN_STAGE_S = 15  # a stage gets at least this much of the budget, or is skipped
WHEELS = REPO / "tools" / "gpu_wheels.txt"  # name==version per line: what the GPU machine lacks
TRAINING_GOAL = 200.0  # training images/s on one H200 at the reference resolution (NVIDIA's H100: about 180)
PIPELINE_GOAL = 5.0  # the input pipeline's images/s over the model's
NO_DALI_SHIM = '''\
"""Hides nvidia.dali, as on the GPU machine (tools/gpu_check.py --rehearse)."""
import sys


class _NoDali:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError("No module named 'nvidia.dali' (hidden by the rehearsal)", name=name)
        return None


sys.meta_path.insert(0, _NoDali())
'''


def wheel_packages() -> list[str]:
    """The distributions tools/gpu_wheels.txt pins, in its order."""
    lines = (line.split("#", 1)[0].strip() for line in WHEELS.read_text().splitlines())
    return [line.split("==", 1)[0] for line in lines if line]


class CheckFailed(Exception):
    """A stage ran but what it checks does not hold; `figures` keeps what it measured."""

    def __init__(self, message: str, figures: dict[str, Any]):
        super().__init__(message)
        self.figures = figures


@dataclass(frozen=True)
class Scale:
    """The sizes a stage runs at: the reference on the GPU, small in the rehearsal."""

    config: str
    overrides: tuple[str, ...]
    iters: int  # timed training steps
    warmup: int  # untimed steps before them, and synchronized ones after them (also the no-host-sync steps)
    eval_images: int  # synthetic val images for the evaluation stage
    pipeline_images: int  # synthetic train images for the pipeline stage
    image_size: tuple[int, int]  # of the synthetic COCO images (before resize)


GPU = Scale("configs/reference.yaml", ("data.backend=torch",), iters=20, warmup=3, eval_images=32, pipeline_images=96,
            image_size=(480, 640))
REHEARSAL = Scale(  # the reference model and LR code at a quarter of the width, on 64x96 images, one thread
    "configs/reference.yaml",
    ("data.backend=torch", "data.dali_threads=1", "data.torch_workers=1", "data.min_size=64", "data.max_size=96",
     "data.buckets=[[64,96],[96,64]]", "solver.ims_per_batch=2", "eval.ims_per_batch=2", "eval.num_workers=0",
     "train.num_threads=1", "model.backbone.width=16", "model.fpn_channels=64", "model.roi_heads.box_head_dim=256",
     "model.roi_heads.mask_head_channels=[64,64,64,64]", "model.roi_heads.batch_size_per_image=64",
     "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=100", "model.rpn.pre_nms_top_n_test=100",
     "model.rpn.post_nms_top_n_test=50"),
    iters=2, warmup=1, eval_images=4, pipeline_images=8, image_size=(80, 120),
)


@dataclass
class Built:
    """A training step built once in a stage process, for the stages that share it."""

    cfg: Config
    ctx: DistributedContext
    step: TrainingStep
    setup: str  # how it was built, for the report
    seconds: float  # building and capturing it


@dataclass
class Session:
    """What the stages of one process share: their scale, whether cuDNN autotunes, and the steps built so far."""

    scale: Scale
    autotune: bool
    steps: dict[tuple[str, bool], Built] = field(default_factory=dict)

    def setup(self, *overrides: str) -> tuple[Config, DistributedContext]:
        import torch

        from train import distributed
        from train.config import load_config

        cfg = load_config(REPO / self.scale.config, [*self.scale.overrides, *overrides])
        ctx = distributed.init_distributed(cfg.train.device, env={})
        distributed.configure_torch(cfg.train, cfg.seed, ctx.rank)
        # Autotuning costs seconds per new convolution shape and pays back only over timed steps.
        torch.backends.cudnn.benchmark = self.autotune and not cfg.train.deterministic
        return cfg, ctx

    def training_step(self, precision: str, graphs: bool) -> tuple[Built, bool]:
        """The step of this precision, built (and captured for the timed bucket) on first use; True if built now."""
        key = (precision, graphs)
        if key in self.steps:
            return self.steps[key], False
        from pipeline.coco_categories import coco_categories  # the reference's 80 classes
        from train.dry_run import trainer_step

        cfg, ctx = self.setup(f"train.precision={precision}", f"train.cuda_graphs={str(graphs).lower()}")
        start = time.perf_counter()
        step, setup = trainer_step(cfg, ctx, coco_categories(), buckets=[timed_bucket(cfg)])
        self.steps[key] = Built(cfg, ctx, step, setup, time.perf_counter() - start)
        return self.steps[key], True


# ---------------------------------------------------------------- stages (run in stage processes)


def timed_bucket(cfg: Config) -> tuple[int, int]:
    """The one bucket the training stages time and capture: the landscape one, 800x1344 for the reference."""
    from train import inputs

    return inputs.bucket_list(cfg.data)[0]


def _training_batch(cfg: Config, ctx: DistributedContext, gt_per_image: int | None = None) -> Batch:
    from model.build import DEFAULT_NUM_CLASSES
    from model.synthetic_batch import synthetic_batch

    max_gt = gt_per_image or 16
    return synthetic_batch(cfg.solver.ims_per_batch, timed_bucket(cfg), DEFAULT_NUM_CLASSES, max_gt,
                           device=ctx.device, seed=cfg.seed, gt_per_image=gt_per_image)


def _check_timed_steps(figures: dict[str, Any], graphs: bool, ctx: DistributedContext) -> None:
    """Every timed step's losses finite, and with graphs on CUDA one replay per step; else CheckFailed keeping `figures`."""
    if not figures["losses_finite"]:
        raise CheckFailed(f"non-finite losses at timed steps {figures['nonfinite_steps']}", figures)
    if graphs and ctx.device.type == "cuda" and figures["graph_replays_per_step"] != 1.0:
        raise CheckFailed(f"the static part replayed {figures['graph_replays_per_step']} graphs per step, not 1", figures)


def _timed_figures(name: str, step: TrainingStep, batch: Batch, scale: Scale, ctx: DistributedContext) -> dict[str, Any]:
    from train.throughput import measure

    return measure(name, lambda lap: step(batch, lap), iters=scale.iters, images_per_iter=len(batch), device=ctx.device,
                   warmup=scale.warmup, breakdown=scale.warmup, replays=lambda: step.graph_replays)


def training_stage(precision: str, graphs: bool, gt_per_image: int | None = None) -> Callable[[Session], dict[str, Any]]:
    """Training images/s of one precision, with or without CUDA graphs, timed between CUDA events."""

    def stage(session: Session) -> dict[str, Any]:
        built, fresh = session.training_step(precision, graphs)
        batch = _training_batch(built.cfg, built.ctx, gt_per_image)
        figures = _timed_figures(precision, built.step, batch, session.scale, built.ctx)
        figures.update(setup=built.setup, build_and_capture_s=built.seconds, built_by_this_stage=fresh,
                       image_size=list(batch.images.shape[-2:]), gt_per_image=batch.num_boxes.tolist())
        _check_timed_steps(figures, graphs, built.ctx)
        return figures

    return stage


def environment(session: Session) -> dict[str, Any]:
    """GPU, driver, torch, CUDA, the carried packages, DALI's absence, and one JPEG decoded as the torch loader decodes."""
    import torch
    from torchvision import __version__ as torchvision_version
    from torchvision.io import decode_jpeg, encode_jpeg

    from pipeline.loader import dali_available
    from pipeline.torch_loader import decode_jpegs
    from train.throughput import timed_seconds

    cuda = torch.cuda.is_available()
    figures: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "driver": _nvidia_smi("driver_version"),
        "cpus": os.cpu_count(),
        "dali_importable": dali_available(),
        "packages": {name: _version(name) for name in wheel_packages()},
    }
    pixels = torch.arange(3 * 480 * 640, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 480, 640)
    data = encode_jpeg(pixels, quality=90)
    device = torch.device("cuda" if cuda else "cpu")
    decode_jpegs([data], device)  # warm-up: nvJPEG's handles
    seconds, _ = timed_seconds(lambda: decode_jpegs([data], device), device)
    decoded = decode_jpegs([data], device)[0].cpu()
    figures["jpeg_decode"] = {
        "device": device.type,
        "shape": list(decoded.shape),
        "ms": 1000.0 * seconds,
        "mean_abs_diff_vs_cpu": float((decoded.float() - decode_jpeg(data).float()).abs().mean()),
    }
    missing = [name for name, version in figures["packages"].items() if version is None]
    if missing:
        raise CheckFailed(f"missing packages {missing}: pass the wheels directory (tools/gpu_check.sh --fetch-wheels)", figures)
    return figures


def _nvidia_smi(field_name: str) -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def no_host_sync(session: Session) -> dict[str, Any]:
    """The graphed bf16 step with the training loop's host work around it (the schedule's LR set, the
    step seeded, loss rows kept on the device) under `torch.cuda.set_sync_debug_mode("error")`: any
    host synchronization raises where it happens.

    The LR the schedule sets is then held at 0 (`hold_weights`): random weights at the schedule's
    LR diverge within a few steps, and NaN boxes would send the step's index arithmetic out of
    range, a device error instead of an answer. Its losses are reported, not checked: this stage
    is about synchronization (the training stages check their losses).
    """
    import torch

    from train.dry_run import hold_weights
    from train.engine import LossReadback, seed_step
    from train.solver import set_learning_rate
    from train.throughput import synchronize

    built, _ = session.training_step("bf16", graphs=True)
    cfg, ctx, step = built.cfg, built.ctx, built.step
    batch = _training_batch(cfg, ctx)
    readback = LossReadback()

    def loop_steps(first: int, count: int) -> None:
        for iteration in range(first, first + count):
            lr = set_learning_rate(step.optimizer, cfg.solver, iteration)
            hold_weights(step.optimizer)
            seed_step((cfg.seed, ctx.rank), iteration)
            scale_before = step.loss_scale()
            readback.add(iteration + 1, step(batch), lr, scale_before, step.loss_scale())

    steps = session.scale.warmup
    loop_steps(0, steps)  # warm-up: allocator, anchors
    readback.flush()
    checked = ctx.device.type == "cuda"
    mode = "error" if checked else "not available without CUDA"
    figures: dict[str, Any] = {"steps": steps, "sync_debug_mode": mode}
    if checked:
        synchronize(ctx.device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        loop_steps(steps, steps)
    except RuntimeError as e:
        raise CheckFailed(f"a host synchronization in the step: {e}", {**figures, "where": traceback.format_exc()[-3000:]})
    finally:
        if checked:
            torch.cuda.set_sync_debug_mode("default")
    logged = readback.flush()
    figures.update(losses=[s.total for s in logged], losses_finite=all(s.finite for s in logged))
    return figures


def _synthetic_shards(root: Path, split: str, num_images: int, scale: Scale, mode: str) -> tuple[Path, Path]:
    """(shard folder, annotations file) of a synthetic COCO split at COCO-like image sizes, in COCO's 80
    categories: the classes of the model the stages build, whose random detections may carry any of them."""
    from pipeline.coco_categories import COCO_CATEGORIES
    from pipeline.sharding import shard_coco
    from pipeline.synthetic_coco import make_synthetic_coco

    annotations = make_synthetic_coco(root, split, num_images, seed=0, image_size=scale.image_size,
                                      num_classes=len(COCO_CATEGORIES))
    shards = root / f"{split}_shards"
    shard_coco(root / f"{split}2017", annotations, shards, mode=mode, samples_per_shard=32,
               workers=min(8, os.cpu_count() or 1), seed=0)
    return shards, annotations


def eval_after_capture(session: Session) -> dict[str, Any]:
    """Train graphed steps, then the real evaluation (torch loader, inference in the training precision,
    COCOeval) on val batches of the training batch's shape: nothing may replay the training graph; the
    next training step replays it again."""
    from pipeline.loader import build_loader
    from train import distributed
    from train.evaluation import COCOEvaluator, inference_on_dataset

    built, _ = session.training_step("bf16", graphs=True)
    cfg, ctx, step = built.cfg, built.ctx, built.step
    batch = _training_batch(cfg, ctx)
    for _ in range(session.scale.warmup):
        step(batch)
    with tempfile.TemporaryDirectory() as tmp:
        shards, annotations = _synthetic_shards(Path(tmp), "val", session.scale.eval_images, session.scale, "eval")
        per_rank = distributed.per_rank_batch(cfg.eval.ims_per_batch, ctx.world_size, "eval.ims_per_batch")
        loader = build_loader(cfg.data, shards, training=False, batch_size=per_rank, device=ctx.device)
        eval_shapes = {tuple(b.images.shape) for b in loader}
        with COCOEvaluator.for_shards(annotations, shards, num_workers=cfg.eval.num_workers) as evaluator:
            replays = step.graph_replays
            start = time.perf_counter()
            metrics = inference_on_dataset(step.model, loader, evaluator, num_warmup=1, autocast=step.autocast)
            eval_s = time.perf_counter() - start
            eval_replays = step.graph_replays - replays
    step(batch)
    figures = {
        "val_images": session.scale.eval_images,
        "eval_batch_shapes": sorted(list(shape) for shape in eval_shapes),
        "train_batch_shape": list(batch.images.shape),
        "eval_s_with_cocoeval": eval_s,
        "replays_during_eval": eval_replays,
        "replays_in_the_next_training_step": step.graph_replays - replays - eval_replays,
        "box_ap": metrics["bbox"]["AP"],
        "mask_ap": metrics["segm"]["AP"],
    }
    if eval_replays:
        raise CheckFailed("evaluation replayed the training graph", figures)
    if ctx.device.type == "cuda" and figures["replays_in_the_next_training_step"] != 1:
        raise CheckFailed("the training step after evaluation did not replay its graph", figures)
    return figures


def torch_pipeline(session: Session) -> dict[str, Any]:
    """The torch fallback loader alone on the training device (GPU decode there), on synthetic shards."""
    from tools.bench_pipeline import run_pipeline_benchmark

    scale = session.scale
    cfg, ctx = session.setup()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shards, _ = _synthetic_shards(Path(tmp), "train", scale.pipeline_images, scale, "train")
        data_s = time.perf_counter() - start
        result = run_pipeline_benchmark(cfg.data, shards, batch_size=cfg.solver.ims_per_batch,
                                        iters=max(scale.pipeline_images // cfg.solver.ims_per_batch, 2), backend="torch",
                                        warmup=2, device=ctx.device)
    return {**result, "synthetic_images": scale.pipeline_images, "image_size": list(scale.image_size),
            "make_shards_s": data_s}


def ddp_one_rank(session: Session) -> dict[str, Any]:
    """One rank of DDP over NCCL (gloo without CUDA), joined and wrapped as the trainer does."""
    import torch

    from pipeline.coco_categories import coco_categories  # the reference's 80 classes
    from train.distributed import data_parallel, join_process_group
    from train.dry_run import trainer_step

    cfg, ctx = session.setup("train.precision=bf16", "train.cuda_graphs=true")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    join_process_group(0, 1, ctx.device)
    try:
        step, setup = trainer_step(cfg, ctx, coco_categories(), buckets=[timed_bucket(cfg)])
        step = replace(step, model=data_parallel(step.model, ctx.device))
        batch = _training_batch(cfg, ctx)
        figures = _timed_figures("ddp", step, batch, session.scale, ctx)
        figures.update(setup=setup, backend=torch.distributed.get_backend(), broadcast_buffers=step.model.broadcast_buffers)
        _check_timed_steps(figures, True, ctx)
        return figures
    finally:
        torch.distributed.destroy_process_group()


def gpu_tests(session: Session) -> dict[str, Any]:
    """`pytest -m gpu`: the gpu-marked tests that need no DALI (its cases skip); their output goes to the log.

    Only the test files that use the marker are collected (collecting the rest costs a minute of
    imports on a small CPU and selects nothing).
    """
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        result = subprocess.run([*command, *files], cwd=REPO)
        figures: dict[str, Any] = {"exit_code": result.returncode, **_junit_counts(junit)}
    if result.returncode not in (0, 5) or figures.get("failed") or figures.get("errors"):  # 5: every test deselected
        raise CheckFailed(f"pytest -m gpu exited with {result.returncode}", figures)
    return figures


def _junit_counts(junit: Path) -> dict[str, Any]:
    """Passed, failed, errors and skipped counts, each failure's test and message, and the skip reasons."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    if not junit.is_file():
        return counts
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = outcome.get("message", "")
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}: {outcome.get('message', '')}"[:500])
    return counts


@dataclass(frozen=True)
class Stage:
    run: Callable[[Session], dict[str, Any]]
    limit_s: float  # counted from the end of the stage before it in its process, or from the process's start
    process: str  # consecutive stages of one process run in one process and share what it built
    times_training: bool = False  # cuDNN autotunes in a process only when one of its stages times training steps


# In the order they run: the most telling first, so a short budget still brings those back.
# docs/PERFORMANCE.md estimates each one's seconds on an H100.
STAGES: dict[str, Stage] = {
    "environment": Stage(environment, 60, "environment"),
    "train_bf16_graphs": Stage(training_stage("bf16", graphs=True), 150, "bf16_graphs", times_training=True),
    "train_bf16_graphs_gt100": Stage(training_stage("bf16", graphs=True, gt_per_image=100), 90, "bf16_graphs",
                                     times_training=True),
    "eval_after_capture": Stage(eval_after_capture, 120, "bf16_graphs"),
    "no_host_sync": Stage(no_host_sync, 90, "bf16_graphs"),
    "torch_pipeline": Stage(torch_pipeline, 120, "torch_pipeline"),
    "gpu_tests": Stage(gpu_tests, 150, "gpu_tests"),
    "train_bf16_eager": Stage(training_stage("bf16", graphs=False), 120, "eager", times_training=True),
    "train_fp32_eager": Stage(training_stage("fp32", graphs=False), 120, "eager", times_training=True),
    "train_fp16_graphs": Stage(training_stage("fp16", graphs=True), 150, "fp16_graphs", times_training=True),
    "ddp_nccl": Stage(ddp_one_rank, 150, "ddp_nccl", times_training=True),
}


def run_stages(names: list[str], scale: Scale, result_dir: Path) -> int:
    """Run `names` in this process, in order, sharing one `Session`; write each one's
    {"status", "figures"} (or its error) to result_dir/NAME.json as it ends.

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    A stage that breaks (an exception other than a failed check: perhaps a CUDA error, which
    leaves the context unusable) ends the process after its result: the driver starts the
    stages after it in a fresh one (exit code STOPPED_EARLY).
    """
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    session = Session(scale, autotune=any(STAGES[name].times_training for name in names))
    failures = 0
    for position, name in enumerate(names, 1):
        print(f"---- {name} {time.strftime('%H:%M:%S')}", flush=True)
        try:
            outcome = {"status": "ok", "figures": STAGES[name].run(session)}
        except CheckFailed as e:
            outcome = {"status": "failed", "error": str(e), "figures": e.figures}
        except Exception as e:  # the stage broke: its traceback is the figure
            outcome = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            _write_json(result_dir / f"{name}.json", outcome)
            return STOPPED_EARLY if position < len(names) else 1
        failures += outcome["status"] != "ok"
        _write_json(result_dir / f"{name}.json", outcome)
    return 1 if failures else 0


# ---------------------------------------------------------------- the driver

STOPPED_EARLY = 3  # a stage process's exit code: a stage broke, the stages after it need a fresh process
_POLL_S = 0.1


def run_all(out_dir: Path, *, rehearse: bool, budget: float, only: list[str], limits: dict[str, float]) -> dict[str, Any]:
    """The selected stages (in STAGES order) in as few processes as `Stage.process` allows;
    OUT_DIR/gpu_check.json rewritten after each stage."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"mode": "rehearsal" if rehearse else "gpu", "budget_s": budget,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
    started = time.perf_counter()
    deadline = started + budget
    with tempfile.TemporaryDirectory() as tmp, open(out_dir / LOG, "a") as log:
        # The stages (and the tests' own subprocesses) import this checkout, installed or not.
        paths = [str(REPO), os.environ.get("PYTHONPATH")]
        if rehearse:  # as on the GPU machine: no DALI
            (Path(tmp) / "sitecustomize.py").write_text(NO_DALI_SHIM)
            paths.insert(0, tmp)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, paths)))
        runner = StageProcesses(rehearse, env, log, Path(tmp), deadline, limits)

        def record(name: str, entry: dict[str, Any]) -> None:
            report["stages"][name] = entry
            report["goals"] = goals(report["stages"])
            report["elapsed_s"] = time.perf_counter() - started
            _write_json(out_dir / RESULTS, report)
            print(f"{name:26s} {entry['status']:8s} {entry['seconds']:6.1f} s  {_headline(entry)}", flush=True)

        pending = [name for name in STAGES if name in only]
        while pending:
            left = deadline - time.perf_counter()
            if left < MIN_STAGE_S and pending[0] not in limits:
                record(pending.pop(0), {"status": "skipped", "seconds": 0.0, "figures": {},
                                        "error": f"{max(left, 0):.0f} s of the budget left"})
                continue
            process = STAGES[pending[0]].process
            together = list(itertools.takewhile(lambda name: STAGES[name].process == process, pending))
            for name, entry in runner.run(together):
                record(name, entry)
                pending.remove(name)
    return report


@dataclass
class StageProcesses:
    """Starts stage processes and follows each stage's limit inside the budget."""

    rehearse: bool
    env: dict[str, str]
    log: Any
    result_dir: Path
    deadline: float  # time.perf_counter() at which the budget ends
    limits: dict[str, float]  # --limit overrides of Stage.limit_s

    def run(self, names: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Run `names` in one process; yield (name, entry) as each stage ends. Returns early, leaving the
        rest to the caller, after a stage that timed out or broke, or where the budget runs short."""
        for name in names:
            (self.result_dir / f"{name}.json").unlink(missing_ok=True)
        self.log.write(f"\n==== {', '.join(names)} {time.strftime('%H:%M:%S')}\n")
        self.log.flush()
        # A session of its own: on timeout the stages and everything they started are ended together.
        process = subprocess.Popen(self.command(names), cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        start = time.perf_counter()
        done = 0
        try:
            for name in names:
                left = self.deadline - start
                if done and left < MIN_STAGE_S and name not in self.limits:
                    return  # the caller records it as skipped
                limit = min(self.limits.get(name, STAGES[name].limit_s), left)
                entry = self._wait_for(name, process, start, limit)
                if entry is None:
                    return  # the stage before it broke and ended the process: a fresh one runs the rest
                start = time.perf_counter()
                done += 1
                yield name, {**entry, "process": STAGES[name].process}
                if entry["status"] == "timeout":
                    return
        finally:
            if done == len(names) and process.poll() is None:
                try:
                    process.wait(timeout=30)  # tearing down CUDA after the last stage
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def command(self, names: list[str]) -> list[str]:
        """The stage process's command line: this script, running `names` (run_stages)."""
        return [sys.executable, str(Path(__file__).resolve()), "--stage", ",".join(names), "--result",
                str(self.result_dir), *(["--rehearse"] if self.rehearse else [])]

    def _wait_for(self, name: str, process: subprocess.Popen, start: float, limit: float) -> dict[str, Any] | None:
        """The stage's entry once its result is written, it passes its limit, or its process ends; None if the
        process ended on purpose before the stage (STOPPED_EARLY)."""
        result = self.result_dir / f"{name}.json"
        while not result.is_file():
            seconds = time.perf_counter() - start
            if process.poll() is not None and not result.is_file():
                if process.returncode == STOPPED_EARLY:
                    return None
                return {"status": "failed", "seconds": seconds, "figures": {},
                        "error": f"the stage process exited with {process.returncode} before writing a result; see {LOG}"}
            if seconds > limit:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return {"status": "timeout", "seconds": seconds, "figures": {}, "error": f"stopped after its {limit:.0f} s limit"}
            time.sleep(_POLL_S)
        return {"seconds": time.perf_counter() - start, **json.loads(result.read_text())}


def goals(stages: dict[str, Any]) -> dict[str, Any]:
    """The figures the goals are about, next to the goals (None while a figure is missing).

    A figure measured by a stage whose check failed still counts (its status says so).
    """

    def figure(stage: str, key: str) -> tuple[float | None, str | None]:
        entry = stages.get(stage, {})
        return entry.get("figures", {}).get(key), entry.get("status")

    model, model_status = figure("train_bf16_graphs", "images_per_s")
    pipeline, pipeline_status = figure("torch_pipeline", "images_per_s")
    headroom = pipeline / model if pipeline and model else None
    worst = next((s for s in (model_status, pipeline_status) if s != "ok"), "ok")

    def goal(value: float | None, target: float, status: str | None) -> dict[str, Any]:
        return {"figure": value, "goal": target, "met": None if value is None else value >= target, "stage_status": status}

    return {"training_images_per_s": goal(model, TRAINING_GOAL, model_status),
            "pipeline_over_model": goal(headroom, PIPELINE_GOAL, worst)}


def _headline(entry: dict[str, Any]) -> str:
    figures = entry.get("figures", {})
    if entry["status"] != "ok":
        measured = f" (measured {figures['images_per_s']:.1f} images/s)" if "images_per_s" in figures else ""
        return entry.get("error", "")[:150] + measured
    if "images_per_s" in figures:
        return f"{figures['images_per_s']:.1f} images/s"
    return ", ".join(f"{k}={v}" for k, v in figures.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40)[:150]


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1, default=str))
    temporary.replace(path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages, in order (process: the stages sharing one): "
        + "; ".join(f"{name} ({stage.process}, limit {stage.limit_s:.0f} s)" for name, stage in STAGES.items()),
    )
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.log (required)")
    parser.add_argument("--rehearse", action="store_true", help="every stage at small sizes, on this machine, DALI hidden")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages together")
    parser.add_argument("--only", help="comma-separated stages to run (default: all, in order): " + ", ".join(STAGES))
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="another time limit for a stage (repeatable)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run these stages (comma-separated) here
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: their results' folder
    return parser


def main(args: argparse.Namespace) -> int:
    scale = REHEARSAL if args.rehearse else GPU
    if args.stage:
        return run_stages(args.stage.split(","), scale, args.result)
    if args.out is None:
        print("--out OUT_DIR is required", file=sys.stderr)
        return 2
    only = args.only.split(",") if args.only else list(STAGES)
    try:
        limits = {name: float(seconds) for name, seconds in (item.split("=", 1) for item in args.limit)}
    except ValueError:
        print(f"--limit takes STAGE=SECONDS, got {args.limit}", file=sys.stderr)
        return 2
    unknown = sorted((set(only) | set(limits)) - set(STAGES))
    if unknown:
        print(f"unknown stages {unknown}; the stages are {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if not args.rehearse and not _cuda_available():
        print("tools/gpu_check.sh needs a CUDA GPU; run it on a GPU machine, or rehearse it here with --rehearse",
              file=sys.stderr)
        return 2
    report = run_all(args.out, rehearse=args.rehearse, budget=args.budget, only=only, limits=limits)
    print(f"written {args.out / RESULTS}")
    return 0 if all(entry["status"] == "ok" for entry in report["stages"].values()) else 1


def _cuda_available() -> bool:
    """Asked in a child process: the driver itself never imports torch (nor initializes CUDA beside the stages)."""
    probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True)
    return probe.returncode == 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
