"""Train Mask R-CNN (ResNet-50-FPN) on WebDataset shards, MLPerf style.

One process (CPU or one GPU):
    python train/main.py --config configs/reference.yaml --data SHARDS/train \\
        --val-data SHARDS/val --val-annotations instances_val2017.json

N GPUs on one node, or several nodes through torchrun's rendezvous:
    torchrun --nproc_per_node=8 train/main.py --config configs/reference.yaml \\
        --data SHARDS/train --val-data SHARDS/val --val-annotations instances_val2017.json \\
        solver.ims_per_batch=96 solver.base_lr=0.12 solver.steps=[16000,21333]
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train/main.py ...

The LR rule (MLPerf closed division): base LR = 0.02 x K (0.02 / K below a global batch of
16), decay steps = (60000, 80000) x (1 + K/10) x 16 / global batch; `train.solver.
mlperf_lr_and_steps(batch, K)` computes them, and the run says at start what it breaks.

Throughput only, no evaluation or checkpoints:
    python train/main.py --config ... --data SHARDS/train --dry-run all --iters 50 --report dry.json

Continue a run: `--resume` (the newest checkpoint in output_dir) or `--resume PATH`.
Results: <output_dir>/summary.json, mlperf.log, metrics.jsonl, config.yaml, checkpoints/.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from mlperf_logging.mllog import constants as C
from torch.nn.parallel import DistributedDataParallel

from model.weights import WeightsError
from pipeline.shard_format import ShardFormatError, read_manifest
from train import components
from train.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    load_checkpoint,
    parameters_are_finite,
    restore_rng_states,
    save_checkpoint,
)
from train.config import Config, ConfigError, load_config
from train.cuda_graphs import graph_static_part
from train.distributed import DistributedContext, init_distributed, shutdown_distributed
from train.engine import (
    NonFiniteGuard,
    NonFiniteLossError,
    TrainState,
    autocast_context,
    make_grad_scaler,
    resolve_precision,
    train_one_epoch,
)
from train.evaluation import COCOEvaluator, EvaluationError, coco_results, inference_on_dataset
from train.metrics import RunPlan, RunReporter
from train.mlperf_log import MLPerfLog, log_eval_accuracy, log_hyperparameters, log_submission
from train.solver import build_optimizer, log_closed_division_check

log = logging.getLogger("train")

# Errors a user can cause and fix; main() ends them with one sentence and exit code 2.
USER_ERRORS = (ConfigError, CheckpointError, ShardFormatError, WeightsError, EvaluationError, NonFiniteLossError)
REPO_ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "reference.yaml"), help="YAML config file")
    parser.add_argument("--data", help="training shard folder (sets data.train_shards)")
    parser.add_argument("--val-data", help="validation shard folder (sets data.val_shards)")
    parser.add_argument("--val-annotations", help="the COCO instances JSON the val shards came from (sets data.val_annotations)")
    parser.add_argument("--resume", nargs="?", const="auto", help="continue from PATH, or from the newest checkpoint in output_dir")
    parser.add_argument("--dry-run", choices=["pipeline", "model", "full", "all"], help="measure throughput only")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per dry run (after warm-up)")
    parser.add_argument("--report", help="write the dry-run figures to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. solver.base_lr=0.04")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """The config file, then the command line's paths, then its KEY=VALUE overrides."""
    paths = {"data.train_shards": args.data, "data.val_shards": args.val_data, "data.val_annotations": args.val_annotations}
    flags = [f"{key}={json.dumps(value)}" for key, value in paths.items() if value]
    if args.resume:
        flags.append(f"train.resume={json.dumps(args.resume)}")
    return load_config(args.config, [*flags, *args.overrides])


def main(args: argparse.Namespace) -> dict[str, Any]:
    wall_start = time.perf_counter()
    cfg = resolve_config(args)
    ctx = init_distributed(cfg.train.device)
    setup_logging(ctx)
    if args.dry_run:
        from train.dry_run import run_dry_runs

        return run_dry_runs(args.dry_run, cfg, ctx, iters=args.iters, report=args.report)
    components.require_inputs(cfg)  # before anything is written: a bad path costs nothing
    output_dir = Path(cfg.output_dir)
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(cfg.to_yaml())
        log.info("resolved config saved to %s", output_dir / "config.yaml")
    mlog = MLPerfLog(output_dir / "mlperf.log" if ctx.is_main else None)
    mlog.start(C.INIT_START)
    log_submission(mlog, cfg)
    log_closed_division_check(cfg)
    components.configure_torch(cfg.train, cfg.seed, ctx.rank)

    # Data: training shards sharded by rank; evaluation reads the original annotations.
    train_loader = components.build_data_loader(cfg, ctx, training=True)
    val_loader = components.build_data_loader(cfg, ctx, training=False)
    evaluator = COCOEvaluator.for_shards(
        cfg.data.val_annotations, cfg.data.val_shards, backend=cfg.eval.backend, num_workers=cfg.eval.num_workers
    )

    # Model, precision, CUDA graphs, DDP.
    categories = components.categories_of(cfg.data.train_shards)
    model = components.build_training_model(cfg, ctx.device, categories)
    precision = resolve_precision(cfg.train.precision, ctx.device)
    autocast = functools.partial(autocast_context, precision, ctx.device, not cfg.train.cuda_graphs)
    scaler = make_grad_scaler(precision, ctx.device)

    # Optimizer and schedule (the LR is set from the iteration inside the loop).
    optimizer, optimizer_name = build_optimizer(model, cfg.solver, ctx.device)
    log.info("optimizer: %s; precision: %s; %d process(es) on %s", optimizer_name, precision, ctx.world_size, ctx.device)

    # Resume: weights, optimizer, scaler, position and RNG streams of the newest checkpoint.
    state, loader_state = TrainState(), None
    resume_path = find_resume_checkpoint(cfg.train.resume, output_dir)
    checkpoint = load_checkpoint(resume_path, cfg) if resume_path else None
    if cfg.train.resume == "auto" and checkpoint is None:
        log.info("no checkpoint in %s yet: starting from iteration 0", output_dir)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        state.iteration, state.epoch = checkpoint["iteration"], checkpoint["epoch"]
        loader_state = components.this_ranks_position(checkpoint["loader"], ctx, resume_path)
        log.info("resumed from %s at iteration %d (epoch %d)", resume_path, state.iteration, state.epoch + 1)

    images_per_rank = components.per_rank_batch(cfg.solver.ims_per_batch, ctx.world_size, "solver.ims_per_batch")
    log.info(graph_static_part(
        model, enabled=cfg.train.cuda_graphs, device=ctx.device, static_shapes=cfg.data.static_shapes,
        buckets=components.bucket_list(cfg.data), images_per_rank=images_per_rank, autocast=autocast,
    ))
    trained = model
    if ctx.is_distributed:
        trained = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if checkpoint is not None:
        restore_rng_states(checkpoint["rng"])  # last, so model building cannot consume the streams

    log_hyperparameters(
        mlog, cfg,
        train_samples=read_manifest(Path(cfg.data.train_shards))["samples"],
        eval_samples=read_manifest(Path(cfg.data.val_shards))["samples"],
    )
    mlog.end(C.INIT_STOP)
    mlog.start(C.RUN_START)
    reporter = RunReporter(
        output_dir, enabled=ctx.is_main, global_batch=cfg.solver.ims_per_batch,
        plan=RunPlan.of(cfg, len(train_loader)), data_timings=train_loader.timings,
    )
    guard = NonFiniteGuard(cfg.train.max_nonfinite_in_a_row)

    def save(epoch: int, position: Any) -> None:
        """Called on every rank: each rank's pipeline position goes into rank 0's checkpoint."""
        positions = components.gather_positions(position, ctx)
        if ctx.is_main:
            save_checkpoint(
                output_dir, model=model, optimizer=optimizer, scaler=scaler, iteration=state.iteration,
                epoch=epoch, loader_state=positions, config=cfg, keep=cfg.train.keep_checkpoints, categories=categories,
            )

    results: dict[str, dict[str, float]] = {}
    reached, eval_seconds, epochs_done, status = False, 0.0, state.epoch, C.ABORTED
    try:
        for epoch in range(state.epoch, cfg.train.max_epochs):
            if state.iteration >= cfg.solver.max_iter:
                break
            state.epoch = epoch
            train_loader.set_epoch(epoch)
            if loader_state is not None:
                train_loader.load_state_dict(loader_state)
                loader_state = None
            mlog.start(C.BLOCK_START, first_epoch_num=epoch + 1, epoch_count=1)
            mlog.start(C.EPOCH_START, epoch_num=epoch + 1)
            reporter.start_epoch(epoch, len(train_loader))
            train_one_epoch(
                trained, optimizer, train_loader, state=state, solver_cfg=cfg.solver, scaler=scaler,
                autocast=autocast, guard=guard, readback_every=cfg.train.loss_readback_every,
                global_batch=cfg.solver.ims_per_batch, max_iter=cfg.solver.max_iter,
                save_checkpoint=lambda: save(epoch, train_loader.state_dict()),
                checkpoint_every=cfg.train.checkpoint_every, on_logged=reporter.steps, step_seed=(cfg.seed, ctx.rank),
            )
            reporter.end_epoch()
            mlog.end(C.EPOCH_STOP, epoch_num=epoch + 1)
            if parameters_are_finite(model):  # a NaN state is never saved over the last good one
                save(epoch + 1, None)
            epochs_done = epoch + 1

            last_epoch = epoch + 1 == cfg.train.max_epochs or state.iteration >= cfg.solver.max_iter
            if epochs_done % cfg.eval.every_epochs == 0 or last_epoch:
                eval_start = time.perf_counter()
                results = evaluate(model, val_loader, evaluator, mlog, epoch + 1, output_dir if ctx.is_main else None)
                eval_seconds += time.perf_counter() - eval_start
                reporter.evaluation(epoch + 1, state.iteration, results)
                reached = results["bbox"]["AP"] >= cfg.eval.box_ap_target and results["segm"]["AP"] >= cfg.eval.mask_ap_target
            mlog.end(C.BLOCK_STOP, first_epoch_num=epoch + 1)
            if reached:
                break  # the quality target: MLPerf stops the clock here
        status = C.SUCCESS if reached else C.ABORTED
    finally:
        mlog.end(C.RUN_STOP, status=status)
        mlog.close()
        reporter.close()
        evaluator.close()

    summary = {
        "epochs": epochs_done,
        "iterations": state.iteration,
        "box_ap": results.get("bbox", {}).get("AP"),
        "mask_ap": results.get("segm", {}).get("AP"),
        "box_ap50": results.get("bbox", {}).get("AP50"),
        "mask_ap50": results.get("segm", {}).get("AP50"),
        "reached_target": reached,
        "train_images_per_s": state.images_seen / state.train_seconds if state.train_seconds else None,
        "eval_s": eval_seconds,
        "wall_s": time.perf_counter() - wall_start,
        "skipped_steps": state.skipped_steps,
        "nonfinite_losses": guard.total,
        "optimizer": optimizer_name,
        "precision": precision,
        "world_size": ctx.world_size,
        # DDP keeps replicas identical; this records that it did (one digest per rank)
        "parameter_digests": components.gather_parameter_digests(model, ctx),
    }
    if ctx.is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("summary (%s):\n%s", output_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def evaluate(
    model: torch.nn.Module, val_loader: Any, evaluator: COCOEvaluator, mlog: MLPerfLog, epoch_num: int, output_dir: Path | None
) -> dict[str, dict[str, float]]:
    """COCO box and mask AP on the val shards (every rank takes part), logged for MLPerf.

    With `output_dir` (rank 0) the detections go to <output_dir>/detections.json, for
    pictures and tools/visualize.py.
    """
    mlog.start(C.EVAL_START, epoch_num=epoch_num)
    results = inference_on_dataset(model, val_loader, evaluator)
    if output_dir is not None:
        (output_dir / "detections.json").write_text(json.dumps(coco_results(evaluator.gathered)))
    mlog.end(C.EVAL_STOP, epoch_num=epoch_num)
    log_eval_accuracy(mlog, epoch=epoch_num, box_ap=results["bbox"]["AP"], mask_ap=results["segm"]["AP"])
    return results


def setup_logging(ctx: DistributedContext) -> None:
    """Rank 0 logs at INFO; other ranks only warnings, so the console shows one run."""
    logging.basicConfig(
        stream=sys.stdout,  # stderr is for the one-sentence errors
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {ctx.rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run(argv: list[str] | None = None) -> int:
    """Command-line entry: user errors end in one sentence and exit code 2."""
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(run())
