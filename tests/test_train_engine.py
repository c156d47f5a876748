"""The step and epoch loop on a stand-in model: bulk readback, NaN handling, checkpoints."""

from pathlib import Path

import pytest
import torch

from train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from train.config import load_config
from train.engine import (
    EpochLoop,
    LoggedStep,
    NonFiniteGuard,
    NonFiniteLossError,
    TrainingStep,
    TrainState,
    make_grad_scaler,
    resolve_precision,
    step_autocast,
    train_one_epoch,
)
from train.solver import build_optimizer

from train_standins import TinyLossModel, tiny_batches

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"
CPU = torch.device("cpu")


def _run(model, batches, *, precision="fp32", limit=3, readback_every=4, checkpoint_every=0, output_dir=None):
    cfg = load_config(REFERENCE, ["solver.base_lr=0.01", "solver.warmup_iters=2"])
    optimizer, _ = build_optimizer(model, cfg.solver, CPU)
    scaler = make_grad_scaler(precision, CPU)
    state, logged = TrainState(), []

    def save():
        save_checkpoint(output_dir, model=model, optimizer=optimizer, scaler=scaler, iteration=state.iteration,
                        epoch=0, loader_state=None, config=cfg)

    step = TrainingStep(model, optimizer, scaler, step_autocast(precision, CPU, cuda_graphs=False), CPU)
    loop = EpochLoop(
        step, cfg.solver, NonFiniteGuard(limit), readback_every=readback_every, global_batch=3, max_iter=10_000,
        save_checkpoint=save if output_dir else None, checkpoint_every=checkpoint_every, on_logged=logged.extend,
    )
    train_one_epoch(loop, batches, state)
    return state, logged


def test_bulk_readback_reports_every_step_exactly():
    batches = tiny_batches(10)
    torch.manual_seed(0)
    _, logged = _run(TinyLossModel(), batches, readback_every=4)
    assert [s.iteration for s in logged] == list(range(1, 11))
    # the same losses computed eagerly, step by step, with the same initial weights and LRs
    torch.manual_seed(0)
    reference = TinyLossModel()
    cfg = load_config(REFERENCE, ["solver.base_lr=0.01", "solver.warmup_iters=2"])
    optimizer, _ = build_optimizer(reference, cfg.solver, CPU)
    for step, batch in zip(logged, batches):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * step.lr / cfg.solver.base_lr
        losses = reference(batch)
        assert step.losses == {k: v.item() for k, v in losses.items()}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def test_fp32_nan_stops_the_run_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    model = TinyLossModel(nan_from=7)
    with pytest.raises(NonFiniteLossError) as error:
        _run(model, tiny_batches(20), limit=3, readback_every=4, checkpoint_every=2, output_dir=tmp_path)
    assert "not finite for 3 iterations in a row, the last at iteration 9" in str(error.value)
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "ckpt-00000006.pt"  # the NaN-weight state at iteration 8 was not saved
    cfg = load_config(REFERENCE, ["solver.base_lr=0.01", "solver.warmup_iters=2"])
    weights = load_checkpoint(newest, cfg)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_nonfinite_stop_says_when_no_checkpoint_was_written_and_where_to_look():
    guard = NonFiniteGuard(1, newest_checkpoint=lambda: None, train_shards="/data/shards/train")
    with pytest.raises(NonFiniteLossError) as error:
        guard.check(LoggedStep(iteration=2, losses={"loss_a": float("nan")}, total=float("nan"), lr=0.01, skipped=False))
    message = str(error.value)
    assert "not finite for 1 iteration in a row, the last at iteration 2 (loss_a=nan)" in message
    assert "the run stopped before writing any checkpoint" in message and "last good checkpoint" not in message
    assert "check the data with tools/shard_coco.py --verify --out /data/shards/train, then lower solver.base_lr" in message


def test_fp16_scaler_skips_the_nan_step_and_counts_it():
    model = TinyLossModel(nan_at={3})
    state, logged = _run(model, tiny_batches(6), precision="fp16", limit=2)  # one NaN: below the limit
    assert [s.skipped for s in logged] == [False, False, True, False, False, False]
    assert state.skipped_steps == 1 and state.iteration == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_precision_resolution():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp8", CPU)


def test_step_autocast_turns_the_weight_cache_off_for_cuda_graphs():
    with step_autocast("bf16", CPU, cuda_graphs=True)():
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
    with step_autocast("bf16", CPU, cuda_graphs=False)():
        assert torch.is_autocast_cache_enabled()
    with step_autocast("fp32", CPU, cuda_graphs=True)():
        assert not torch.is_autocast_enabled("cpu")


def test_loss_scale_reads_the_scalers_scale_as_a_tensor_on_the_device():
    model = TinyLossModel()
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.01), make_grad_scaler("fp16", CPU),
                        step_autocast("fp16", CPU, cuda_graphs=False), CPU)
    assert step.loss_scale().item() == step.scaler.get_scale() == 65536.0
    step.scaler.update(1024.0)
    assert step.loss_scale().item() == 1024.0
    plain = TrainingStep(model, step.optimizer, None, step.autocast, CPU)
    assert plain.loss_scale() is None
