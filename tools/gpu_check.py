"""The prepared GPU check: every figure the first GPU window should bring back, from one command.

    tools/gpu_check.sh OUT_DIR [WHEELS_DIR]     # on the GPU machine: torch, no network, no DALI
    tools/gpu_check.sh --rehearse OUT_DIR       # here: every stage on the CPU at small sizes, DALI hidden
    tools/gpu_check.sh OUT_DIR WHEELS_DIR --only no_host_sync,gpu_tests --budget 150   # a rerun

Each stage runs in its own process under its own time limit, inside a total budget, so a stage
that fails, hangs or takes the CUDA context down costs only itself; a stage that no longer fits
the budget is recorded as skipped. After every stage OUT_DIR/gpu_check.json is rewritten:

    {"mode": "gpu" | "rehearsal", "stages": {NAME: {"status": "ok" | "failed" | "timeout" | "skipped",
     "seconds": ..., "figures": {...}}}, "goals": {...}}

and the stage's output is appended to OUT_DIR/gpu_check.log: two files in all (8 may come
back). The training figures come from the trainer's own step (`train.engine.TrainingStep`, built
as train/main.py builds it) timed between CUDA events (train/throughput.py). docs/PERFORMANCE.md
lists the stages, their figures and the goals.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from train.config import Config
    from train.distributed import DistributedContext

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project is not installed there

# Each stage imports what it uses inside its function: a stage process starts in seconds, and
# the driver never imports the model or the pipeline at all.

RESULTS = "gpu_check.json"
LOG = "gpu_check.log"
DEFAULT_BUDGET_S = 480  # the whole check, under the 9 minutes one device command may take
MIN_STAGE_S = 15  # a stage gets at least this much of the budget, or is skipped
WHEEL_PACKAGES = ("pycocotools", "mlperf-logging", "webdataset", "braceexpand")
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


class CheckFailed(Exception):
    """A stage ran but what it checks does not hold; `figures` keeps what it measured."""

    def __init__(self, message: str, figures: dict[str, Any]):
        super().__init__(message)
        self.figures = figures


@dataclass(frozen=True)
class Scale:
    """The sizes a stage runs at: the reference on the GPU, tiny in the rehearsal."""

    config: str
    overrides: tuple[str, ...]
    iters: int  # timed training steps
    warmup: int  # untimed steps before them (also the steps of the no-host-sync check)
    eval_images: int  # synthetic val images for the evaluation stage
    pipeline_images: int  # synthetic train images for the pipeline stage
    image_size: tuple[int, int]  # of the synthetic COCO images (before resize)


GPU = Scale("configs/reference.yaml", ("data.backend=torch",), iters=20, warmup=3, eval_images=32, pipeline_images=96,
            image_size=(480, 640))
REHEARSAL = Scale(  # the demo's model, smaller still: the rehearsal proves plumbing, not speed
    "configs/demo.yaml",
    ("data.backend=torch", "data.dali_threads=1", "data.torch_workers=1", "data.min_size=64", "data.max_size=96", "data.buckets=[[64,96],[96,64]]",
     "solver.ims_per_batch=2", "eval.ims_per_batch=2", "eval.num_workers=0", "model.rpn.pre_nms_top_n_train=200",
     "model.rpn.post_nms_top_n_train=100", "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=50"),
    iters=1, warmup=1, eval_images=4, pipeline_images=8, image_size=(80, 120),
)


# ---------------------------------------------------------------- stages (each in its own process)


def _setup(scale: Scale, *overrides: str) -> tuple[Config, DistributedContext]:
    from train import distributed
    from train.config import load_config
    from train.distributed import init_distributed

    cfg = load_config(REPO / scale.config, [*scale.overrides, *overrides])
    ctx = init_distributed(cfg.train.device, env={})
    distributed.configure_torch(cfg.train, cfg.seed, ctx.rank)
    return cfg, ctx


def _training_batch(cfg: Config, ctx: DistributedContext, gt_per_image: int | None = None):
    from model.build import DEFAULT_NUM_CLASSES
    from model.synthetic_batch import synthetic_batch
    from train import inputs

    height, width = inputs.bucket_list(cfg.data)[0]  # the landscape bucket: 800x1344 for the reference
    max_gt = gt_per_image or 16
    return synthetic_batch(cfg.solver.ims_per_batch, (height, width), DEFAULT_NUM_CLASSES, max_gt,
                           device=ctx.device, seed=cfg.seed, gt_per_image=gt_per_image)


def _expect_replays(figures: dict[str, Any], graphs: bool, ctx: DistributedContext) -> None:
    if graphs and ctx.device.type == "cuda" and figures["graph_replays_per_step"] != 1.0:
        raise CheckFailed(f"the static part replayed {figures['graph_replays_per_step']} graphs per step, not 1", figures)


def _finite_losses(step, batch) -> dict[str, float]:
    losses = {name: float(value) for name, value in step(batch).items()}
    if not all(math.isfinite(v) for v in losses.values()):
        raise CheckFailed(f"non-finite losses {losses}", {"losses": losses})
    return losses


def training_stage(precision: str, graphs: bool, gt_per_image: int | None = None) -> Callable[[Scale], dict[str, Any]]:
    """Training images/s of one precision, with or without CUDA graphs, timed between CUDA events."""

    def stage(scale: Scale) -> dict[str, Any]:
        from train.dry_run import trainer_step
        from train.throughput import measure
        from pipeline.coco_categories import coco_categories  # the reference's 80 classes

        cfg, ctx = _setup(scale, f"train.precision={precision}", f"train.cuda_graphs={str(graphs).lower()}")
        start = time.perf_counter()
        step, setup = trainer_step(cfg, ctx, coco_categories())
        build_s = time.perf_counter() - start
        batch = _training_batch(cfg, ctx, gt_per_image)
        figures = measure(precision, lambda lap: step(batch, lap), iters=scale.iters, images_per_iter=len(batch),
                          device=ctx.device, warmup=scale.warmup, breakdown=scale.warmup, replays=lambda: step.graph_replays)
        figures.update(setup=setup, build_and_capture_s=build_s, image_size=list(batch.images.shape[-2:]),
                       gt_per_image=batch.num_boxes.tolist(), losses=_finite_losses(step, batch))
        _expect_replays(figures, graphs, ctx)
        return figures

    return stage


def environment(scale: Scale) -> dict[str, Any]:
    """GPU, driver, torch, CUDA, the carried packages, DALI's absence, and one JPEG decoded on the GPU."""
    from torchvision import __version__ as torchvision_version
    from torchvision.io import decode_jpeg, encode_jpeg

    from pipeline.loader import dali_available
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
        "packages": {name: _version(name) for name in WHEEL_PACKAGES},
    }
    pixels = torch.arange(3 * 480 * 640, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 480, 640)
    data = encode_jpeg(pixels, quality=90)
    device = "cuda" if cuda else "cpu"
    decode_jpeg(data, device=device)  # warm-up: nvJPEG's handles
    seconds, _ = timed_seconds(lambda: decode_jpeg(data, device=device), torch.device(device))
    decoded = decode_jpeg(data, device=device).cpu()
    figures["jpeg_decode"] = {
        "device": device,
        "shape": list(decoded.shape),
        "ms": 1000.0 * seconds,
        "mean_abs_diff_vs_cpu": float((decoded.float() - decode_jpeg(data).float()).abs().mean()),
    }
    missing = [name for name, version in figures["packages"].items() if version is None]
    if missing:
        raise CheckFailed(f"missing packages {missing}: pass the wheels directory (docs/PERFORMANCE.md)", figures)
    return figures


def _nvidia_smi(field: str) -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def no_host_sync(scale: Scale) -> dict[str, Any]:
    """The graphed bf16 step as the loop runs it (LR, step, loss rows kept on the device) under
    `torch.cuda.set_sync_debug_mode("error")`: any host synchronization raises where it happens."""
    from train.dry_run import trainer_step
    from pipeline.coco_categories import coco_categories  # the reference's 80 classes
    from train.engine import LossReadback
    from train.solver import set_learning_rate
    from train.throughput import synchronize

    cfg, ctx = _setup(scale, "train.precision=bf16", "train.cuda_graphs=true")
    step, _ = trainer_step(cfg, ctx, coco_categories())
    batch = _training_batch(cfg, ctx)
    readback = LossReadback()

    def loop_steps(first: int, count: int) -> None:
        for iteration in range(first, first + count):
            lr = set_learning_rate(step.optimizer, cfg.solver, iteration)
            scale_before = step.loss_scale()
            readback.add(iteration + 1, step(batch), lr, scale_before, step.loss_scale())

    loop_steps(0, scale.warmup)  # warm-up: allocator, anchors, cudnn autotuning
    readback.flush()
    checked = ctx.device.type == "cuda"
    mode = "error" if checked else "not available without CUDA"
    figures: dict[str, Any] = {"steps": scale.warmup, "sync_debug_mode": mode}
    if checked:
        synchronize(ctx.device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        loop_steps(scale.warmup, scale.warmup)
    except RuntimeError as e:
        raise CheckFailed(f"a host synchronization in the step: {e}", {**figures, "where": traceback.format_exc()[-3000:]})
    finally:
        if checked:
            torch.cuda.set_sync_debug_mode("default")
    logged = readback.flush()
    figures["losses_finite"] = all(math.isfinite(s.total) for s in logged)
    if not figures["losses_finite"]:
        raise CheckFailed("non-finite losses", figures)
    return figures


def _synthetic_shards(root: Path, split: str, num_images: int, scale: Scale, mode: str) -> tuple[Path, Path]:
    """(shard folder, annotations file) of a synthetic COCO split at COCO-like image sizes."""
    from pipeline.sharding import shard_coco
    from pipeline.synthetic_coco import make_synthetic_coco

    annotations = make_synthetic_coco(root, split, num_images, seed=0, image_size=scale.image_size)
    shards = root / f"{split}_shards"
    shard_coco(root / f"{split}2017", annotations, shards, mode=mode, samples_per_shard=32,
               workers=min(8, os.cpu_count() or 1), seed=0)
    return shards, annotations


def eval_after_capture(scale: Scale) -> dict[str, Any]:
    """Train two graphed steps, then the real evaluation (torch loader, inference in the training
    precision, COCOeval) on val batches of the training batch's shape: nothing may replay the
    training graph; the next training step replays it again."""
    from pipeline.loader import build_loader
    from train import distributed
    from train.dry_run import trainer_step
    from pipeline.coco_categories import coco_categories  # the reference's 80 classes
    from train.evaluation import COCOEvaluator, inference_on_dataset

    cfg, ctx = _setup(scale, "train.precision=bf16", "train.cuda_graphs=true")
    step, _ = trainer_step(cfg, ctx, coco_categories())
    batch = _training_batch(cfg, ctx)
    for _ in range(scale.warmup):
        step(batch)
    with tempfile.TemporaryDirectory() as tmp:
        shards, annotations = _synthetic_shards(Path(tmp), "val", scale.eval_images, scale, "eval")
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
        "val_images": scale.eval_images,
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


def torch_pipeline(scale: Scale) -> dict[str, Any]:
    """The torch fallback loader alone on the training device (GPU decode there), on synthetic shards."""
    from tools.bench_pipeline import run_pipeline_benchmark

    cfg, ctx = _setup(scale)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shards, _ = _synthetic_shards(Path(tmp), "train", scale.pipeline_images, scale, "train")
        data_s = time.perf_counter() - start
        result = run_pipeline_benchmark(cfg.data, shards, batch_size=cfg.solver.ims_per_batch,
                                        iters=max(scale.pipeline_images // cfg.solver.ims_per_batch, 2), backend="torch",
                                        warmup=2, device=ctx.device)
    return {**result, "synthetic_images": scale.pipeline_images, "image_size": list(scale.image_size),
            "make_shards_s": data_s}


def ddp_one_rank(scale: Scale) -> dict[str, Any]:
    """One rank of DDP over NCCL (gloo without CUDA), joined and wrapped as the trainer does."""
    from train.distributed import data_parallel, join_process_group
    from train.dry_run import trainer_step
    from train.throughput import measure
    from pipeline.coco_categories import coco_categories  # the reference's 80 classes

    cfg, ctx = _setup(scale, "train.precision=bf16", "train.cuda_graphs=true")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    join_process_group(0, 1, ctx.device)
    try:
        step, setup = trainer_step(cfg, ctx, coco_categories())
        step = replace(step, model=data_parallel(step.model, ctx.device))
        batch = _training_batch(cfg, ctx)
        figures = measure("ddp", lambda lap: step(batch, lap), iters=scale.iters, images_per_iter=len(batch),
                          device=ctx.device, warmup=scale.warmup, breakdown=scale.warmup, replays=lambda: step.graph_replays)
        figures.update(setup=setup, backend=torch.distributed.get_backend(),
                       broadcast_buffers=step.model.broadcast_buffers,
                       losses=_finite_losses(step, batch))
        _expect_replays(figures, True, ctx)
        return figures
    finally:
        torch.distributed.destroy_process_group()


def gpu_tests(scale: Scale) -> dict[str, Any]:
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


# In the order they run: the most telling first, so a short budget still brings those back.
STAGES: dict[str, tuple[Callable[..., dict[str, Any]], int]] = {
    "environment": (environment, 60),
    "train_bf16_graphs": (training_stage("bf16", graphs=True), 150),
    "eval_after_capture": (eval_after_capture, 150),
    "no_host_sync": (no_host_sync, 120),
    "train_bf16_eager": (training_stage("bf16", graphs=False), 120),
    "train_fp16_graphs": (training_stage("fp16", graphs=True), 150),
    "train_fp32_eager": (training_stage("fp32", graphs=False), 150),
    "train_bf16_graphs_gt100": (training_stage("bf16", graphs=True, gt_per_image=100), 150),
    "torch_pipeline": (torch_pipeline, 150),
    "ddp_nccl": (ddp_one_rank, 150),
    "gpu_tests": (gpu_tests, 240),
}


def run_stage(name: str, scale: Scale, result_file: Path) -> int:
    """Run one stage in this process; write {"status", "figures"} (or the error) to `result_file`."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        figures = STAGES[name][0](scale)
        outcome = {"status": "ok", "figures": figures}
    except CheckFailed as e:
        outcome = {"status": "failed", "error": str(e), "figures": e.figures}
    except Exception as e:  # the stage broke: its traceback is the figure
        outcome = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    result_file.write_text(json.dumps(outcome, indent=1, default=str))
    return 0 if outcome["status"] == "ok" else 1


# ---------------------------------------------------------------- the driver


def run_all(out_dir: Path, *, rehearse: bool, budget: float, only: list[str], limits: dict[str, float]) -> dict[str, Any]:
    """Every selected stage in its own process; OUT_DIR/gpu_check.json rewritten after each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"mode": "rehearsal" if rehearse else "gpu", "budget_s": budget,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, open(out_dir / LOG, "a") as log:
        # The stages (and the tests' own subprocesses) import this checkout, installed or not.
        paths = [str(REPO), os.environ.get("PYTHONPATH")]
        if rehearse:  # as on the GPU machine: no DALI
            (Path(tmp) / "sitecustomize.py").write_text(NO_DALI_SHIM)
            paths.insert(0, tmp)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, paths)))
        for name in only:
            left = budget - (time.perf_counter() - started)
            limit = min(limits.get(name, STAGES[name][1]), left)
            if limit < MIN_STAGE_S and name not in limits:
                entry = {"status": "skipped", "seconds": 0.0, "figures": {}, "error": f"{left:.0f} s of the budget left"}
            else:
                entry = _stage_process(name, rehearse, limit, Path(tmp) / f"{name}.json", env, log)
            report["stages"][name] = entry
            report["goals"] = goals(report["stages"])
            report["elapsed_s"] = time.perf_counter() - started
            _write_json(out_dir / RESULTS, report)
            print(f"{name:26s} {entry['status']:8s} {entry['seconds']:6.1f} s  {_headline(entry)}", flush=True)
    return report


def _stage_process(
    name: str, rehearse: bool, limit: float, result_file: Path, env: dict[str, str], log: Any
) -> dict[str, Any]:
    log.write(f"\n==== {name} (limit {limit:.0f} s) {time.strftime('%H:%M:%S')}\n")
    log.flush()
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--result", str(result_file),
               *(["--rehearse"] if rehearse else [])]
    start = time.perf_counter()
    # A session of its own: on timeout the stage and everything it started are ended together.
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        process.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        timed_out = True
    seconds = time.perf_counter() - start
    if timed_out:
        return {"status": "timeout", "seconds": seconds, "figures": {}, "error": f"stopped after its {limit:.0f} s limit"}
    if not result_file.is_file():
        return {"status": "failed", "seconds": seconds, "figures": {},
                "error": f"the stage process exited with {process.returncode} before writing a result; see {LOG}"}
    return {"seconds": seconds, **json.loads(result_file.read_text())}


def goals(stages: dict[str, Any]) -> dict[str, Any]:
    """The figures the goals are about, next to the goals (None while a figure is missing)."""

    def figure(stage: str, key: str) -> float | None:
        entry = stages.get(stage, {})
        return entry.get("figures", {}).get(key) if entry.get("status") == "ok" else None

    model = figure("train_bf16_graphs", "images_per_s")
    pipeline = figure("torch_pipeline", "images_per_s")
    headroom = pipeline / model if pipeline and model else None

    def goal(value: float | None, target: float) -> dict[str, Any]:
        return {"figure": value, "goal": target, "met": None if value is None else value >= target}

    return {"training_images_per_s": goal(model, TRAINING_GOAL), "pipeline_over_model": goal(headroom, PIPELINE_GOAL)}


def _headline(entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return entry.get("error", "")[:150]
    figures = entry["figures"]
    if "images_per_s" in figures:
        return f"{figures['images_per_s']:.1f} images/s"
    return ", ".join(f"{k}={v}" for k, v in figures.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40)[:150]


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1, default=str))
    temporary.replace(path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.log (required)")
    parser.add_argument("--rehearse", action="store_true", help="every stage at small sizes, on this machine, DALI hidden")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages together")
    parser.add_argument("--only", help="comma-separated stages to run (default: all, in order): " + ", ".join(STAGES))
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="another time limit for a stage (repeatable)")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)  # internal: run one stage here
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> int:
    scale = REHEARSAL if args.rehearse else GPU
    if args.stage:
        return run_stage(args.stage, scale, args.result)
    if args.out is None:
        print("--out OUT_DIR is required", file=sys.stderr)
        return 2
    if not args.rehearse and not torch.cuda.is_available():
        print("tools/gpu_check.sh needs a CUDA GPU; run it on a GPU machine, or rehearse it here with --rehearse",
              file=sys.stderr)
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
    report = run_all(args.out, rehearse=args.rehearse, budget=args.budget, only=only, limits=limits)
    print(f"written {args.out / RESULTS}")
    return 0 if all(entry["status"] == "ok" for entry in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
