"""Train Mask R-CNN (ResNet-50-FPN) on WebDataset shards, MLPerf style.

One process (CPU or one GPU):
    python train/main.py --config configs/batch8_1gpu.yaml --data SHARDS/train \\
        --val-data SHARDS/val --val-annotations instances_val2017.json train.weights=R-50.pkl

N GPUs on one node, or several nodes through torchrun's rendezvous:
    torchrun --nproc_per_node=8 train/main.py --config configs/batch96_8gpu.yaml \\
        --data SHARDS/train --val-data SHARDS/val --val-annotations instances_val2017.json train.weights=R-50.pkl
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train/main.py \\
        --config configs/batch256_32gpu.yaml ...

The recipes in configs/ are accepted closed-division schedules. The LR rule (MLPerf closed
division): base LR = 0.02 x K1 (0.02 / K1 below a global batch of 16), decay steps =
(60000, 80000) x (1 + K2/10) x 16 / global batch, K1 and K2 two independent integers (K2 >= 0);
the run says at start what it breaks (`train.solver.closed_division_violations`).

Throughput only, no evaluation or checkpoints:
    python train/main.py --config ... --data SHARDS/train --dry-run all --iters 50 --report dry.json

Evaluation (train/async_evaluation.py): at each epoch end inference runs on the training
devices, then mask encoding and COCOeval run beside the next epoch (eval.asynchronous=true);
the loop polls for results at its loss read-back points and epoch ends, and the run stops at
the first epoch whose result reaches the target. The final epochs' results are awaited.

A run lives in one output_dir (train/run_folder.py has the rules): a fresh run needs a folder
without another run's files; `--resume` continues from the newest readable checkpoint there
(or `--resume PATH`), first running the evaluations that a kill or a stop left unfinished (each
on its own checkpoint's weights), and may extend a finished run (a larger solver.max_iter or
train.max_epochs). `torchrun --max-restarts=N` restarts resume by themselves. Results:
<output_dir>/summary.json (with what each evaluation cost the training), run.json, mlperf.log
(one log per attempt), metrics.jsonl, config.yaml, checkpoints/.

Exit codes: 0 done (or already done); 2 a user error, one sentence on stderr, nothing lost;
143 (SIGTERM), 129 (SIGHUP) and 130 (Ctrl-C) stopped on the signal after saving a checkpoint; 1
anything else, including a rank that stopped answering, an evaluation lost beside training (one
sentence; its checkpoint stays, and --resume runs it) and a loader worker process killed (the OOM
killer: one sentence, a checkpoint of the steps so far).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mlperf_logging.mllog import constants as C

from train.config import (
    REFERENCE_CONFIG, Config, ConfigError, load_config, load_saved_config, lookup, parse_override, read_saved_config,
)
from train.output_paths import OutputPathError, check_outputs_apart
from train.run_folder import RunFolder, RunFolderError, check_output_dir

if TYPE_CHECKING:
    import torch

    from model.weights import WeightsFile
    from train.async_evaluation import Evaluation
    from train.distributed import DistributedContext

log = logging.getLogger("train")

RUN_INPUTS = ("data.train_shards", "data.val_shards", "data.val_annotations", "train.weights")  # never written
DRAIN_POLL_S = 0.5  # waiting for the last results: a signal is honoured within this


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can cause and fix; run() ends them with one sentence and exit code 2."""
    from model.weights import WeightsError
    from pipeline.shard_format import ShardFormatError
    from train.checkpoint import CheckpointError
    from train.engine import NonFiniteLossError
    from train.evaluation import EvaluationError

    return (
        ConfigError, CheckpointError, ShardFormatError, WeightsError, EvaluationError, NonFiniteLossError, RunFolderError,
        OutputPathError,
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="YAML config file (default: configs/reference.yaml; resuming, the run folder's own config.yaml)"
    )
    parser.add_argument("--data", help="training shard folder (sets data.train_shards)")
    parser.add_argument("--val-data", help="validation shard folder (sets data.val_shards)")
    parser.add_argument("--val-annotations", help="the COCO instances JSON the val shards came from (sets data.val_annotations)")
    parser.add_argument(
        "--resume", nargs="?", const="auto",
        help="continue the run in output_dir from its newest readable checkpoint; with a run folder, continue that run "
        "(its config, data and categories come from the folder); with a checkpoint file, continue from it "
        "(an argument holding '=' is an override)",
    )
    parser.add_argument("--dry-run", choices=["pipeline", "model", "full", "all"], help="measure throughput only")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per dry run (after warm-up)")
    parser.add_argument("--report", help="write the dry-run figures to this JSON file")
    parser.add_argument(
        "--trace", metavar="FILE.json",
        help="write a Chrome trace (Perfetto) of the loader and the step, with a per-op table and FILE.png (sets "
             "train.trace): dry runs trace their timed iterations, training the iterations of train.trace_iters",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, before or after the flags, e.g. solver.base_lr=0.04"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, overrides anywhere among the flags; `--resume KEY=VALUE` is `--resume` plus an override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--resume" and "=" in argv[i + 1]:
            argv[i] = "--resume=auto"  # the next argument stays an override, in its place among the others
    return get_args_parser().parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace, weights_needs: Sequence[str] = ()) -> Config:
    """The config file, then what the weights need (`weights_needs`), then the command line's paths and overrides.

    Resuming without --config, the file is the run folder's own config.yaml (the resolved config of
    its latest attempt), so `--resume RUN` (or `--resume output_dir=RUN`) alone continues the run as
    it was; the command line still overrides it, and the attempt checks and records what that changes.
    """
    resume, run_dir = args.resume, None
    if resume and resume != "auto" and Path(resume).is_dir():
        run_dir, resume = Path(resume), "auto"
    paths = {"data.train_shards": args.data, "data.val_shards": args.val_data, "data.val_annotations": args.val_annotations,
             "train.trace": args.trace}
    flags = [f"{key}={json.dumps(value)}" for key, value in paths.items() if value]
    if run_dir is not None:
        flags.append(f"output_dir={json.dumps(str(run_dir))}")
    if resume:
        flags.append(f"train.resume={json.dumps(resume)}")
    overrides = [*weights_needs, *flags, *args.overrides]
    saved = saved_run_config(args)
    if saved is not None:
        return load_saved_config(read_saved_config(saved), str(saved), overrides)
    return load_config(args.config or REFERENCE_CONFIG, overrides)


def saved_run_config(args: argparse.Namespace) -> Path | None:
    """The run folder's config.yaml that a `--resume` without --config continues with, if there is one."""
    if not args.resume or args.config is not None:
        return None
    if args.resume != "auto" and Path(args.resume).is_dir():
        output_dir = Path(args.resume)
    else:  # output_dir from the command line, else the reference's default
        output_dir = Path(load_config(REFERENCE_CONFIG, [o for o in args.overrides if o.startswith("output_dir=")]).output_dir)
    path = output_dir / "config.yaml"
    return path if path.is_file() else None


def fit_to_weights(args: argparse.Namespace, cfg: Config) -> tuple[Config, WeightsFile | None]:
    """The config with what train.weights was trained with, and the file read once (None without weights).

    The file's needs (model/weights.py: the stride's place and the input normalization, and for
    torchvision's COCO Mask R-CNN its anchors) come between the config file and the command line,
    so a KEY=VALUE still wins (the load then refuses a value the weights cannot take, naming the
    key). A resumed run's saved config has them already.
    """
    from model.weights import read_weights

    if not cfg.train.weights or saved_run_config(args) is not None:
        return cfg, None
    weights = read_weights(cfg.train.weights)
    needs = [need for need in weights.model_overrides() if not _holds(cfg, need)]
    if not needs:
        return cfg, weights
    fitted = resolve_config(args, weights_needs=needs)
    shown = [need for need in needs if _holds(fitted, need)]
    if shown:
        log.info("%s was trained with %s: set for this run (a KEY=VALUE on the command line overrides it)",
                 weights, ", ".join(shown))
    return fitted, weights


def _holds(cfg: Config, override: str) -> bool:
    """Whether `cfg` already has the value of `override` (KEY=VALUE)."""
    key, value = parse_override(override)
    return lookup(cfg, key) == value


def main(args: argparse.Namespace) -> dict[str, Any]:
    wall_start, init_start_ms = time.perf_counter(), time.time() * 1000
    cfg = resolve_config(args)
    check_outputs_apart(
        {"output_dir": cfg.output_dir, "--report": args.report, "train.trace (--trace)": cfg.train.trace},
        {"--config": args.config, **{key: lookup(cfg, key) for key in RUN_INPUTS}},
    )
    # The heavy imports come once the command line and the config are known to be good.
    from model.build import build_model_with_weights
    from pipeline.loader import LoaderWorkerLost
    from pipeline.shard_format import read_manifest
    from train.async_evaluation import EvaluationLost, EvaluationQueue
    from train.checkpoint import (
        checkpoint_dir,
        checkpoint_path,
        gather_positions,
        load_checkpoint,
        parameter_digest,
        parameters_are_finite,
        restore_rng_states,
        save_checkpoint,
        shard_set_digest,
        this_ranks_position,
    )
    from train.cuda_graphs import graph_static_part
    from train.distributed import (
        broadcast_from_main,
        configure_torch,
        data_parallel,
        gather_from_ranks,
        init_distributed,
        per_rank_batch,
    )
    from train.engine import EpochLoop, NonFiniteGuard, TrainState, build_training_step, resolve_precision, train_one_epoch
    from train.evaluation import MAX_PENDING_PER_WORKER, COCOEvaluator
    from train.inputs import build_data_loader, require_inputs
    from train.interrupts import StopRequest, TrainingStopped
    from train.metrics import RunPlan, RunReporter
    from train.mlperf_log import MLPerfLog, log_eval_accuracy, log_hyperparameters, log_submission
    from train.solver import log_closed_division_check

    ctx = init_distributed(cfg.train.device, collective_timeout_s=cfg.train.collective_timeout_s)
    setup_logging(ctx)
    if args.dry_run:
        from train.dry_run import run_dry_runs

        return run_dry_runs(args.dry_run, cfg, ctx, iters=args.iters, report=args.report)

    # Checks before anything is written: a bad value or path costs nothing.
    require_inputs(cfg)
    cfg, weights = fit_to_weights(args, cfg)
    check_output_dir(cfg.output_dir)
    resolve_precision(cfg.train.precision, ctx.device)  # raises on a bad train.precision
    evaluating = cfg.eval.every_epochs > 0
    output_dir = Path(cfg.output_dir)

    # Everything below is released however main ends: signal handlers, the folder's lock, logs, workers.
    with contextlib.ExitStack() as cleanup:
        stop = StopRequest(ctx, cfg.train.loss_readback_every)  # SIGTERM / Ctrl-C: checkpoint, then exit
        stop.install()
        cleanup.callback(stop.restore)
        # The run folder: rank 0 locks it (its first write, .lock) and decides how this attempt
        # starts, before anything is built, so that a refusal costs a second; every rank follows.
        resume = cfg.train.resume or ("auto" if ctx.restart_count else "")
        if ctx.restart_count:
            log.info("torchrun restart %d: resuming from the newest checkpoint in %s", ctx.restart_count, output_dir)
        folder = RunFolder(output_dir) if ctx.is_main else None
        if folder is not None:
            cleanup.callback(folder.release)
        plan, checkpoint = plan_attempt(folder, cfg, resume) if folder is not None else (None, None)
        plan = broadcast_from_main(ctx, plan)  # other ranks read the checkpoint that rank 0 chose
        if isinstance(plan, Exception):
            raise plan
        if plan.finished:
            log.info("%s", plan.finished)
            summary_file = output_dir / "summary.json"
            return json.loads(summary_file.read_text()) if summary_file.is_file() else {}

        log_closed_division_check(cfg)
        configure_torch(cfg.train, cfg.seed, ctx.rank)

        # Data: training shards sharded by rank; evaluation reads the original annotations.
        train_loader = build_data_loader(cfg, ctx, training=True)
        val_loader = queue = None
        if evaluating:
            val_loader = build_data_loader(cfg, ctx, training=False)
            evaluator = COCOEvaluator.for_shards(
                cfg.data.val_annotations, cfg.data.val_shards, backend=cfg.eval.backend, num_workers=cfg.eval.num_workers,
                scoring_workers=cfg.eval.scoring_workers,
                # beside training, inference never waits for the encoders (~0.3 MB of masks an image wait in memory)
                max_pending_per_worker=None if cfg.eval.asynchronous else MAX_PENDING_PER_WORKER,
                tables=False,  # one line per epoch (evaluation_sentence); the statistics go to metrics.jsonl
            )
            cleanup.callback(evaluator.close)
            queue = EvaluationQueue(
                evaluator, ctx, asynchronous=cfg.eval.asynchronous, detections_path=output_dir / "detections.json"
            )
            cleanup.callback(queue.close)  # first: a scoring process still running is killed

        # Model, precision, CUDA graphs, DDP.
        train_manifest = read_manifest(Path(cfg.data.train_shards))
        categories, shards_digest = train_manifest["categories"], shard_set_digest(train_manifest)
        # A resumed run's weights are its checkpoint's: train.weights (and what it would say about its layers) does not apply.
        initial_weights = None if plan.checkpoint is not None else weights or cfg.train.weights
        model = build_model_with_weights(cfg.model, categories, initial_weights, ctx.device, for_training=True)

        # The step: precision, scaler, optimizer (the LR is set from the iteration inside the loop).
        step = build_training_step(cfg, ctx.device, model)
        optimizer, scaler, autocast = step.optimizer, step.scaler, step.autocast
        log.info("%s; %d process(es) on %s", step.description, ctx.world_size, ctx.device)

        # Resume: weights, optimizer, scaler, position and RNG streams of the chosen checkpoint.
        state, loader_state = TrainState(), None
        if plan.checkpoint is not None:
            checkpoint = checkpoint or load_checkpoint(plan.checkpoint, cfg)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if scaler is not None and checkpoint["scaler"]:
                scaler.load_state_dict(checkpoint["scaler"])
            state.iteration, state.epoch = checkpoint["iteration"], checkpoint["epoch"]
            loader_state = this_ranks_position(checkpoint["loader"], ctx, plan.checkpoint)
            log.info("resumed from %s at iteration %d (epoch %d)", plan.checkpoint, state.iteration, state.epoch + 1)

        images_per_rank = per_rank_batch(cfg.solver.ims_per_batch, ctx.world_size, "solver.ims_per_batch")
        log.info(graph_static_part(model, cfg, ctx, autocast))
        if ctx.is_distributed:
            step = dataclasses.replace(step, model=data_parallel(model, ctx.device))
        if checkpoint is not None:
            restore_rng_states(checkpoint["rng"])  # last, so model building cannot consume the streams

        # From here on this attempt writes: run.json, config.yaml, its own MLPerf log, metrics.jsonl.
        attempt, mlperf_path = 0, None
        if folder is not None:
            attempt, mlperf_path = folder.begin_attempt(
                run_id=plan.run_id, resumed_from=str(plan.checkpoint) if plan.checkpoint else None, notes=plan.notes
            )
            (output_dir / "config.yaml").write_text(cfg.to_yaml())
            log.info("attempt %d of run %s; resolved config saved to %s", attempt, folder.run_id, output_dir / "config.yaml")
        mlog = MLPerfLog(mlperf_path)
        cleanup.callback(mlog.close)
        mlog.start(C.INIT_START, time_ms=init_start_ms)
        log_submission(mlog, cfg)
        if checkpoint is not None:
            mlog.event(C.INIT_CHECKPOINT_STEP, state.iteration)  # this attempt continues a run
        log_hyperparameters(
            mlog, cfg,
            train_samples=train_manifest["samples"],
            eval_samples=read_manifest(Path(cfg.data.val_shards))["samples"] if evaluating else 0,
            images_per_rank=images_per_rank,
        )
        mlog.end(C.INIT_STOP)
        mlog.start(C.RUN_START)
        reporter = RunReporter(
            output_dir, enabled=ctx.is_main, global_batch=cfg.solver.ims_per_batch,
            plan=RunPlan.of(cfg, len(train_loader)), data_timings=train_loader.timings,
        )
        cleanup.callback(reporter.close)
        reporter.write({"attempt": attempt, "resumed_from": str(plan.checkpoint) if plan.checkpoint else None,
                        "iteration": state.iteration})
        newest = plan.checkpoint  # the newest checkpoint of the run, for the messages of a stop
        guard = NonFiniteGuard(cfg.train.max_nonfinite_in_a_row, lambda: newest, cfg.data.train_shards)

        def save(epoch: int, position: Any) -> None:
            """Called on every rank: each rank's pipeline position goes into rank 0's checkpoint."""
            nonlocal newest
            positions = gather_positions(position, ctx)
            path = checkpoint_path(output_dir, state.iteration)
            if folder is not None:
                folder.checkpoint_coming(path.name)
                save_checkpoint(
                    output_dir, model=model, optimizer=optimizer, scaler=scaler, iteration=state.iteration,
                    epoch=epoch, loader_state=positions, config=cfg, run_id=folder.run_id, categories=categories,
                    shards_digest=shards_digest,
                )
                folder.rotate(checkpoint_dir(output_dir), cfg.train.keep_checkpoints)
            newest = path

        results, evaluated_at = plan.results, plan.evaluated_at
        reached = results is not None and reaches_target(results, cfg.eval)
        evaluations: list[Evaluation] = []  # this attempt's, with what each cost the training

        def collect(finished: list[Evaluation]) -> bool:
            """Record results in epoch order, on every rank; True once one reached the target (nothing after it counts)."""
            nonlocal results, evaluated_at, reached
            for evaluation in finished:
                if reached:
                    break  # the run ended at an earlier epoch's result
                results, evaluated_at = evaluation.results, evaluation.iteration
                mlog.end(C.EVAL_STOP, epoch_num=evaluation.epoch)
                log_eval_accuracy(mlog, epoch=evaluation.epoch, box_ap=results["bbox"]["AP"], mask_ap=results["segm"]["AP"])
                reporter.evaluation(evaluation.epoch, evaluation.iteration, results, timing=evaluation.timing())
                if folder is not None:
                    folder.evaluation_done(evaluation.epoch, evaluation.iteration, results)
                evaluations.append(evaluation)
                log.info(evaluation_sentence(evaluation))
                reached = reaches_target(results, cfg.eval)
            return reached

        def start_evaluation(epoch_num: int, iteration: int) -> None:
            """Inference now, on every rank; its result comes in beside training (at once when synchronous)."""
            mlog.start(C.EVAL_START, epoch_num=epoch_num)
            collect(queue.start(epoch_num, iteration, model, val_loader, autocast))

        def poll() -> bool:
            return collect(queue.poll())

        def save_mid_epoch() -> None:
            save(state.epoch, train_loader.state_dict())

        loop_step = step
        if cfg.train.trace:  # an opt-in wrapper: the step's phases and the loader's spans, for a window of iterations
            from train.trace import TraceWindow, rank_path, traced_step

            window = TraceWindow(train_loader.timer, rank_path(cfg.train.trace, ctx.rank, ctx.world_size),
                                 *cfg.train.trace_iters, device=ctx.device)
            cleanup.callback(window.finish)  # a run that ends inside the window writes what it traced
            loop_step = traced_step(step, window, done=state.iteration)
        loop = EpochLoop(
            loop_step, cfg.solver, guard, readback_every=cfg.train.loss_readback_every, global_batch=cfg.solver.ims_per_batch,
            max_iter=cfg.solver.max_iter, step_seed=(cfg.seed, ctx.rank), save_checkpoint=save_mid_epoch,
            checkpoint_every=cfg.train.checkpoint_every, on_logged=reporter.steps, stop=stop,
            poll=poll if queue is not None else None,
        )

        epochs_done, status, outcome = state.epoch, C.ABORTED, "failed"
        try:
            for due in plan.due_evaluations:  # a kill or a stop left them unfinished: each on its checkpoint's weights
                weights = due_weights(model, due, state.iteration)
                if weights is None:
                    if folder is not None:
                        folder.drop_due_evaluation(due.iteration)
                    continue
                log.info("running the evaluation of epoch %d that the previous attempt did not finish (%s)",
                         due.epoch, due.checkpoint.name)
                mlog.start(C.BLOCK_START, first_epoch_num=due.epoch, epoch_count=1)  # the end of that block
                with weights:
                    start_evaluation(due.epoch, due.iteration)
                mlog.end(C.BLOCK_STOP, first_epoch_num=due.epoch)
            for epoch in range(state.epoch, cfg.train.max_epochs):
                if reached or state.iteration >= cfg.solver.max_iter:
                    break
                state.epoch = epoch
                train_loader.set_epoch(epoch)
                if loader_state is not None:
                    train_loader.load_state_dict(loader_state)
                    loader_state = None
                mlog.start(C.BLOCK_START, first_epoch_num=epoch + 1, epoch_count=1)
                mlog.start(C.EPOCH_START, epoch_num=epoch + 1)
                reporter.start_epoch(epoch, len(train_loader))
                epoch_ended = train_one_epoch(loop, train_loader, state)
                reporter.end_epoch()
                if reached:
                    break  # an earlier epoch's result reached the target while this one trained: the run ends here
                mlog.end(C.EPOCH_STOP, epoch_num=epoch + 1)
                epochs_done = epoch + 1
                if queue is not None and poll():
                    mlog.end(C.BLOCK_STOP, first_epoch_num=epoch + 1)
                    break  # an earlier epoch's result: this epoch is neither saved nor evaluated
                last_epoch = epochs_done == cfg.train.max_epochs or state.iteration >= cfg.solver.max_iter
                due = evaluating and (epochs_done % cfg.eval.every_epochs == 0 or last_epoch) and evaluated_at != state.iteration
                if parameters_are_finite(model):  # a NaN state is never saved over the last good one
                    if due and folder is not None:  # recorded first: a kill before its result leaves it due
                        folder.evaluation_due(epochs_done, state.iteration, checkpoint_path(output_dir, state.iteration).name)
                    if epoch_ended:
                        save(epoch + 1, None)
                    else:  # cut short by solver.max_iter: its position is kept, so that an extended run continues it
                        save(epoch, train_loader.state_dict())
                if due:
                    start_evaluation(epochs_done, state.iteration)
                mlog.end(C.BLOCK_STOP, first_epoch_num=epoch + 1)
                if reached or last_epoch:
                    break  # reached: the quality target, where MLPerf stops the clock
                stopping = stop.agreed(at_readback=True)
                if stopping:
                    raise TrainingStopped(*stopping, iteration=state.iteration)
            while queue is not None and queue.pending and not reached:  # the last epochs' results end the run
                stopping = stop.agreed(at_readback=True)
                if stopping:
                    raise TrainingStopped(*stopping, iteration=state.iteration)
                collect(queue.poll(timeout_s=DRAIN_POLL_S))
            status, outcome = (C.SUCCESS if reached else C.ABORTED), "finished"
        except TrainingStopped as stopped:
            stopped.checkpoint, stopped.world_size = newest, ctx.world_size  # the engine knows neither
            outcome = stopped.sentence()
            raise
        except (*user_errors(), EvaluationLost) as e:
            outcome = f"stopped: {e}"
            raise
        except LoaderWorkerLost as lost:  # between two steps: the steps so far are kept (one process; ranks would wait)
            if not ctx.is_distributed and newest != checkpoint_path(output_dir, state.iteration) \
                    and parameters_are_finite(model):
                save_mid_epoch()
            kept = f"its newest checkpoint is {newest}" if newest else "no checkpoint was written yet"
            outcome = f"stopped: {lost}"
            raise LoaderWorkerLost(f"{lost}; {kept}: continue with --resume") from None
        except KeyboardInterrupt:
            outcome = "interrupted by a second Ctrl-C, without saving"
            raise
        finally:
            # Beside MLPerf's status: why the run stopped and its target, so that tools/time_to_train.py can
            # tell a fine-tune that trained its schedule (no target) from a run that missed its target.
            ended = "target" if reached else "schedule" if outcome == "finished" else "stopped"
            mlog.end(C.RUN_STOP, status=status, ended=ended, quality_target=quality_target(cfg.eval))
            if folder is not None:
                folder.end_attempt(outcome)

        if reached and folder is not None:
            for due in folder.due_evaluations():  # later epochs' evaluations do not count after the target
                folder.drop_due_evaluation(due["iteration"])
        if not evaluating:
            log.info("no evaluation (eval.every_epochs=0): the run ends without box and mask AP; "
                     "evaluate %s with tools/evaluate.py to get them", newest)
        summary = {
            "epochs": epochs_done,
            "iterations": state.iteration,
            "box_ap": results["bbox"]["AP"] if results else None,
            "mask_ap": results["segm"]["AP"] if results else None,
            "box_ap50": results["bbox"]["AP50"] if results else None,
            "mask_ap50": results["segm"]["AP50"] if results else None,
            "reached_target": reached,
            "target_epoch": next((e.epoch for e in evaluations if reaches_target(e.results, cfg.eval)), None),
            "evaluated": evaluating,
            "eval_asynchronous": evaluating and cfg.eval.asynchronous,
            "train_images_per_s": state.images_seen / state.train_seconds if state.train_seconds else None,
            # what evaluation cost the training (this attempt): its wait per epoch, inference included
            "eval_wait_s": sum(e.timing()["wait_s"] for e in evaluations),
            "eval_background_s": sum(e.background_s for e in evaluations),
            "evaluations": [e.summary() for e in evaluations],
            "wall_s": time.perf_counter() - wall_start,
            "skipped_steps": state.skipped_steps,
            "nonfinite_losses": guard.total,
            "optimizer": step.optimizer_name,
            "precision": step.precision,
            "world_size": ctx.world_size,
            "attempt": attempt,
            # DDP keeps replicas identical; this records that it did (one digest per rank)
            "parameter_digests": gather_from_ranks(ctx, parameter_digest(model)),
        }
        if ctx.is_main:
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("%s; summary in %s", summary_sentence(summary), output_dir / "summary.json")
        return summary


@dataclass
class DueEvaluation:
    """An evaluation that an earlier attempt left unfinished: epoch `epoch`, on the weights of `checkpoint`."""

    epoch: int
    iteration: int
    checkpoint: Path


@dataclass
class AttemptPlan:
    """How an attempt starts, decided on rank 0 and sent to every rank."""

    run_id: str | None = None  # the run it continues (None: a new run)
    checkpoint: Path | None = None  # continue from here (None: iteration 0)
    due_evaluations: list[DueEvaluation] = field(default_factory=list)  # run first, oldest first
    results: dict[str, dict[str, float]] | None = None  # an earlier attempt's evaluation of the checkpoint's weights
    evaluated_at: int | None = None  # the iteration of `results`
    finished: str | None = None  # set when nothing is left to do: the sentence that says so
    notes: list[str] = field(default_factory=list)  # what this attempt changes (a moved schedule end)


def quality_target(eval_cfg: Config) -> dict[str, float] | None:
    """The box and mask AP the run stops at, None when it has none: no evaluation, or a target of 1.0
    (AP never exceeds 1: a fine-tune that trains to the end of its schedule)."""
    if not eval_cfg.every_epochs or max(eval_cfg.box_ap_target, eval_cfg.mask_ap_target) >= 1.0:
        return None
    return {"BBOX": eval_cfg.box_ap_target, "SEGM": eval_cfg.mask_ap_target}


def reaches_target(results: Mapping[str, Any], eval_cfg: Config) -> bool:
    """Box and mask AP both at the quality target (`results`: a result, or run.json's record of one)."""
    target = quality_target(eval_cfg)
    return target is not None and results["bbox"]["AP"] >= target["BBOX"] and results["segm"]["AP"] >= target["SEGM"]


def plan_attempt(folder: RunFolder, cfg: Config, resume: str) -> tuple[AttemptPlan | Exception, dict[str, Any] | None]:
    """Rank 0: lock the folder and decide where this attempt starts, with the checkpoint's contents.

    A user error is returned, not raised: every rank raises it once the plan is sent. What the
    command line changes against the checkpoint's config is refused (what the run computes:
    train/checkpoint.py) or recorded in the attempt's notes and the log.
    """
    from pipeline.shard_format import read_manifest
    from train.checkpoint import (
        check_training_data,
        load_checkpoint,
        newest_readable_checkpoint,
        remove_abandoned_temporaries,
        schedule_changes,
        setting_changes,
    )

    try:
        folder.lock()
        for path in remove_abandoned_temporaries(folder.path):  # the lock is ours: no other writer is alive
            log.info("removed %s, a checkpoint write that a killed trainer left unfinished", path)
        if not resume:
            folder.require_fresh()
            return AttemptPlan(), None
        found = newest_readable_checkpoint(folder.path, cfg) if resume == "auto" else (Path(resume), load_checkpoint(resume, cfg))
    except user_errors() as e:
        folder.release()
        return e, None
    if found is None:
        log.info("no checkpoint in %s yet: starting from iteration 0", folder.path)
        return AttemptPlan(run_id=folder.run_id), None
    path, state = found
    if folder.run_id and state.get("run_id") and state["run_id"] != folder.run_id:
        folder.release()
        return RunFolderError(
            f"checkpoint {path} belongs to run {state['run_id']}, but output_dir={folder.path} holds run {folder.run_id}; "
            "resume it into its own folder or a new one"
        ), None
    try:
        check_training_data(state, path, cfg.data.train_shards, read_manifest(Path(cfg.data.train_shards)))
    except user_errors() as e:
        folder.release()
        return e, None
    plan = AttemptPlan(run_id=folder.run_id or state.get("run_id") or None, checkpoint=path)
    moved_end, changed = schedule_changes(state["config"], cfg.to_dict()), setting_changes(state["config"], cfg.to_dict())
    for note in moved_end:
        log.info("the schedule's end moves on resume: %s", note)
    for note in changed:
        log.info("changed on resume: %s", note)
    plan.notes = [*moved_end, *changed]
    iteration = state["iteration"]
    epoch_num = state["epoch"] + (state["loader"] is not None)  # a mid-epoch checkpoint belongs to the epoch after
    for due in sorted(folder.due_evaluations(), key=lambda d: d["iteration"]):
        if cfg.eval.every_epochs and due["iteration"] <= iteration:  # weights from before the resumed point
            plan.due_evaluations.append(DueEvaluation(due["epoch"], due["iteration"], path.parent / due["checkpoint"]))
        else:
            folder.drop_due_evaluation(due["iteration"])
            why = "eval.every_epochs=0" if not cfg.eval.every_epochs else f"training continues from {path.name}, before it"
            log.info("the due evaluation of epoch %d (%s) will not run as such: %s", due["epoch"], due["checkpoint"], why)
    done = folder.evaluation_at(iteration)
    if done is not None:
        plan.results = {kind: done[kind] for kind in ("bbox", "segm")}
        plan.evaluated_at = iteration
    # with evaluation beside training, the result that reached the target may be an earlier checkpoint's
    reaching = next((e for e in folder.evaluations() if e["iteration"] <= iteration and reaches_target(e, cfg.eval)), None)
    trained_out = iteration >= cfg.solver.max_iter or state["epoch"] >= cfg.train.max_epochs
    if reaching is not None:
        for due in plan.due_evaluations:  # after the target, later epochs' evaluations do not count
            folder.drop_due_evaluation(due.iteration)
        plan.due_evaluations = []
        plan.finished = finished_sentence(folder.path, cfg, iteration, epoch_num, reaching, reached=True)
        folder.release()
    elif trained_out and not plan.due_evaluations:
        if cfg.eval.every_epochs and done is None:  # the final weights were never evaluated (a run from before run.json)
            plan.due_evaluations = [DueEvaluation(epoch_num, iteration, path)]
        else:
            plan.finished = finished_sentence(folder.path, cfg, iteration, epoch_num, done, reached=False)
            folder.release()
    return plan, state


def finished_sentence(
    output_dir: Path, cfg: Config, iteration: int, epoch_num: int, evaluation: Mapping[str, Any] | None, reached: bool
) -> str:
    """What `--resume` says about a run that has nothing left to do (its results stay untouched)."""
    ap = f"box AP {evaluation['bbox']['AP']:.4f}, mask AP {evaluation['segm']['AP']:.4f}" if evaluation else ""
    if reached:
        return (
            f"the run in {output_dir} already finished: epoch {evaluation['epoch']} reached the quality target ({ap}); "
            "its results stay as they are; to train it further, raise eval.box_ap_target / eval.mask_ap_target"
        )
    if iteration >= cfg.solver.max_iter:
        how = f"resume with a larger solver.max_iter (now {cfg.solver.max_iter})"
    else:
        how = f"resume with a larger train.max_epochs (now {cfg.train.max_epochs})"
    return (
        f"the run in {output_dir} already finished at iteration {iteration} (epoch {epoch_num}){' with ' + ap if ap else ''}; "
        f"its results stay as they are; to train it further, {how}"
    )


def due_weights(model: torch.nn.Module, due: DueEvaluation, iteration: int) -> contextlib.AbstractContextManager | None:
    """What `model` holds while `due` is evaluated: its own weights (training continues from them) or its checkpoint's.

    None (and a log line) when that checkpoint cannot be read: the evaluation is dropped.
    """
    from train.checkpoint import CheckpointError, read_checkpoint, weights_loaded

    if due.iteration == iteration:
        return contextlib.nullcontext()
    try:
        return weights_loaded(model, read_checkpoint(due.checkpoint)["model"])
    except CheckpointError as e:
        log.warning("the due evaluation of epoch %d cannot run: %s", due.epoch, e)
        return None


def summary_sentence(summary: dict[str, Any]) -> str:
    """The run's end in one line: the result, the epoch that reached the target, the speed, what evaluation cost."""
    epochs = summary["epochs"]
    parts = [f"{summary['iterations']} iterations, {epochs} epoch{'' if epochs == 1 else 's'}"]
    if summary["box_ap"] is not None:
        parts.append(f"box AP {summary['box_ap']:.4f}, mask AP {summary['mask_ap']:.4f}")
    if summary["target_epoch"] is not None:
        parts.append(f"target reached at epoch {summary['target_epoch']}")
    if summary["train_images_per_s"]:
        parts.append(f"{summary['train_images_per_s']:.1f} images/s training")
    if summary["evaluated"]:
        parts.append(f"training waited {summary['eval_wait_s']:.1f} s for evaluations")
    return "run ended: " + "; ".join(parts)


def evaluation_sentence(evaluation: Evaluation) -> str:
    """One log line: an epoch's result and what it cost the training."""
    timing = evaluation.timing()
    beside = f"; {timing['background_s']:.1f} s beside training" if timing["background_s"] else ""
    return (
        f"epoch {evaluation.epoch} (iteration {evaluation.iteration}): box AP {evaluation.results['bbox']['AP']:.4f}, "
        f"mask AP {evaluation.results['segm']['AP']:.4f}; training waited {timing['wait_s']:.1f} s for it "
        f"(inference {timing['inference_s']:.1f} s){beside}, COCOeval {timing['cocoeval_s']:.1f} s"
    )


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
    """Command-line entry: user errors end in one sentence and exit code 2, a signal in 128 + its number.

    The config is checked before the heavy imports (torch, DALI), so a bad value answers at once.
    """
    args = parse_args(argv)
    try:
        resolve_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.loader import LoaderWorkerLost
    from train.async_evaluation import EvaluationLost
    from train.distributed import shutdown_distributed
    from train.interrupts import TrainingStopped

    try:
        main(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(stopped.sentence(), file=sys.stderr)
        return stopped.exit_code
    except (EvaluationLost, LoaderWorkerLost) as lost:
        print(f"error: {lost}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted by a second Ctrl-C: stopped at once, without saving; continue from the newest checkpoint "
              "with --resume", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(run())
