"""The training step and the loop over one epoch.

`train_step` is the whole step: losses under autocast -> sum -> backward -> optimizer
step. It returns the loss tensors without reading them: copying a value to the host
waits for the GPU, so `LossReadback` keeps them on the device and copies them in one go
every `train.loss_readback_every` steps (and before a checkpoint, which must only be
written after its losses are known to be finite).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from train.checkpoint import parameters_are_finite
from train.config import ConfigError
from train.config_schema import PRECISIONS
from train.interrupts import StopRequest, TrainingStopped
from train.solver import set_learning_rate


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops instead of training on garbage."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA, fp32 on CPU; anything else as asked."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def autocast_context(precision: str, device: torch.device, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16, nothing for fp32. CUDA-graph replay needs cache_enabled=False."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (steps with inf/nan gradients are skipped); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def no_lap(stage: str) -> None:
    """The default `lap` hook of `train_step`: nothing."""


def train_step(
    model: nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
    lap: Callable[[str], None] = no_lap,
) -> dict[str, torch.Tensor]:
    """One optimizer step on one batch; returns the detached losses, still on the device.

    `lap(stage)` is called as forward, backward and optimizer end: the dry runs' per-stage
    breakdown hooks in there (train/dry_run.py), the training loop leaves it alone.
    """
    with autocast():
        losses = model(batch)
    total = sum(losses.values())
    lap("forward")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        total.backward()
        lap("backward")
        optimizer.step()
    else:
        scaler.scale(total).backward()
        lap("backward")
        scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/nan
        scaler.update()
    lap("optimizer")
    return {name: loss.detach() for name, loss in losses.items()}


@dataclass
class LoggedStep:
    iteration: int  # 1-based count of steps done
    losses: dict[str, float]
    total: float
    lr: float
    skipped: bool  # fp16: the scaler skipped this step's update


class LossReadback:
    """Per-step losses kept on the device and copied to the host in one transfer."""

    def __init__(self, scaler: torch.amp.GradScaler | None):
        self.scaler = scaler
        self._rows: list[torch.Tensor] = []
        self._meta: list[tuple[int, float]] = []
        self._names: list[str] = []

    def add(self, iteration: int, losses: dict[str, torch.Tensor], lr: float, scale_before: torch.Tensor | None) -> None:
        self._names = list(losses)
        values = [loss.float() for loss in losses.values()]
        if scale_before is not None:
            # the scaler lowers its scale exactly when it skips a step
            values += [scale_before.to(values[0].device).float(), self.scaler._scale.float().reshape(())]
        self._rows.append(torch.stack(values))
        self._meta.append((iteration, lr))

    def __len__(self) -> int:
        return len(self._rows)

    def flush(self) -> list[LoggedStep]:
        if not self._rows:
            return []
        table = torch.stack(self._rows)
        if dist.is_available() and dist.is_initialized():
            # the mean over ranks: every rank logs the same values and takes the same NaN decisions
            dist.all_reduce(table)
            table /= dist.get_world_size()
        table = table.cpu().tolist()  # the only host sync of the loop
        steps = []
        n = len(self._names)
        for (iteration, lr), row in zip(self._meta, table):
            losses = dict(zip(self._names, row[:n]))
            skipped = len(row) > n and row[n + 1] < row[n]
            steps.append(LoggedStep(iteration, losses, sum(losses.values()), lr, skipped))
        self._rows.clear()
        self._meta.clear()
        return steps


def scale_snapshot(scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
    if scaler is None:
        return None
    if scaler._scale is None:  # created by the first scale(); until then get_scale() reads no tensor
        return torch.tensor(scaler.get_scale())
    # GradScaler.get_scale() calls .item(); a device-side copy of the private scale does not.
    return scaler._scale.detach().clone().reshape(())


@dataclass
class NonFiniteGuard:
    """Counts non-finite losses; `limit` of them in a row stop the run.

    `newest_checkpoint` says where the run's newest checkpoint is (None: none yet), and
    `train_shards` names the data, so that the stop's sentence says what was kept and where
    to look: a NaN in the data looks exactly like an LR that is too high.
    """

    limit: int
    newest_checkpoint: Callable[[], Any] = lambda: None
    train_shards: str = ""
    in_a_row: int = 0
    total: int = 0

    def check(self, step: LoggedStep) -> None:
        if math.isfinite(step.total):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            newest = self.newest_checkpoint()
            kept = (
                f"the run stopped; its newest checkpoint, {newest}, holds finite weights"
                if newest else "the run stopped before writing any checkpoint"
            )
            raise NonFiniteLossError(
                f"the loss was not finite for {self.in_a_row} iteration{'s' * (self.in_a_row > 1)} in a row, the last at iteration "
                f"{step.iteration} ({', '.join(f'{k}={v:.4g}' for k, v in step.losses.items())}); {kept}: "
                f"check the data with tools/shard_coco.py --verify --out {self.train_shards or 'SHARDS'}, "
                "then lower solver.base_lr or lengthen solver.warmup_iters"
            )


@dataclass
class TrainState:
    """Where the run is: what a checkpoint stores besides the modules' states."""

    iteration: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    skipped_steps: int = 0  # fp16 steps the scaler skipped
    images_seen: int = 0
    train_seconds: float = 0.0


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    *,
    state: TrainState,
    solver_cfg: Any,
    scaler: torch.amp.GradScaler | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
    guard: NonFiniteGuard,
    readback_every: int,
    global_batch: int,
    max_iter: int,
    save_checkpoint: Callable[[], None] | None = None,
    checkpoint_every: int = 0,
    on_logged: Callable[[list[LoggedStep]], None] = lambda steps: None,
    step_seed: tuple[int, ...] | None = None,
    stop: StopRequest | None = None,
    poll: Callable[[], bool] | None = None,
) -> bool:
    """Step through `batches` until it ends or `max_iter` steps are done; True if it ended.

    Every `readback_every` steps (and before each checkpoint) the losses are read back,
    checked by `guard` and handed to `on_logged` (progress bar, metrics file).
    `save_checkpoint` is called every `checkpoint_every` steps, after that check, when
    every parameter is finite. With `step_seed` (e.g. (seed, rank)) torch's generator is
    seeded from (*step_seed, iteration) before each step, so the step's random draws
    (proposal sampling) do not depend on what else used the generator: a resumed run draws
    exactly what the uninterrupted one did, whatever its input pipeline does.
    When the ranks agree to `stop` (a signal), the step's checkpoint is saved and
    TrainingStopped raised. The loop leaves right after the step that reaches `max_iter`, so
    the pipeline's position is that step's (a run extended on resume continues from there).
    `poll()` is called on every rank at the read-back points (unless stopping): True ends the
    epoch there (an evaluation beside training reached the quality target: the run is over,
    nothing more is saved); if it raises (that evaluation was lost), the step's checkpoint is
    saved first.
    """
    model.train()
    readback = LossReadback(scaler)
    started = time.perf_counter()

    def read_back() -> None:
        steps = readback.flush()
        state.skipped_steps += sum(step.skipped for step in steps)
        on_logged(steps)
        for step in steps:
            guard.check(step)

    def target_reached() -> bool:
        try:
            return poll()
        except Exception:
            if save_checkpoint is not None and parameters_are_finite(model):
                save_checkpoint()  # whatever failed beside training, the steps since the last checkpoint are kept
            raise

    ended = True
    for batch in batches:
        lr = set_learning_rate(optimizer, solver_cfg, state.iteration)
        if step_seed is not None:
            torch.manual_seed(int(np.random.SeedSequence([*step_seed, state.iteration]).generate_state(1)[0]))
        scale_before = scale_snapshot(scaler)
        losses = train_step(model, batch, optimizer, scaler, autocast)
        state.iteration += 1
        state.images_seen += global_batch
        readback.add(state.iteration, losses, lr, scale_before)
        checkpoint_due = save_checkpoint is not None and checkpoint_every and state.iteration % checkpoint_every == 0
        readback_due = len(readback) >= readback_every or checkpoint_due
        stopping = stop.agreed(at_readback=readback_due) if stop is not None else None
        if readback_due or stopping:
            read_back()
        if readback_due and not stopping and poll is not None and target_reached():
            ended = False
            break
        saving = (checkpoint_due or stopping) and save_checkpoint is not None
        if saving and parameters_are_finite(model):
            save_checkpoint()  # never over finite weights with NaN ones: the last good one stays
        if stopping:
            state.train_seconds += time.perf_counter() - started
            raise TrainingStopped(*stopping, iteration=state.iteration)  # main adds the checkpoint
        if state.iteration >= max_iter:
            ended = False
            break
    read_back()
    state.train_seconds += time.perf_counter() - started
    return ended
