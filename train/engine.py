"""The training step and the loop over one epoch.

`TrainingStep` is the whole step: losses under autocast -> sum -> backward -> optimizer
step. It is the one step of the trainer, the dry runs, tools/gpu_check.py and
tools/bench_model.py; its `lap` hook lets them time its stages. It returns the loss tensors
without reading them: copying a value to the host waits for the GPU, so `LossReadback` keeps
them on the device and copies them in one go every `train.loss_readback_every` steps (and
before a checkpoint, which must only be written after its losses are known to be finite).
`train_one_epoch(loop, batches, state)` runs the step over one epoch as `EpochLoop` says.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from pipeline.epoch_plan import derived_seed
from pipeline.loader import LoaderWorkerLost
from train.checkpoint import parameters_are_finite
from train.config import Config, ConfigError
from train.config_schema import PRECISIONS
from train.interrupts import StopRequest, TrainingStopped
from train.solver import build_optimizer, set_learning_rate


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


def step_autocast(precision: str, device: torch.device, *, cuda_graphs: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """The training step's autocast: with CUDA graphs autocast's weight-cast cache is off, as capture and replay need."""
    return functools.partial(autocast_context, precision, device, cache_enabled=not cuda_graphs)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (steps with inf/nan gradients are skipped); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def no_lap(stage: str) -> None:
    """The default `lap` hook of `TrainingStep`: nothing."""


@dataclass
class TrainingStep:
    """One optimizer step on one batch: `step(batch)` returns the detached losses, still on the device.

    `lap(stage)` is called as forward, backward and optimizer end: the dry runs' per-stage
    breakdown hooks in there (train/throughput.py `StageClock`), the training loop leaves it alone.
    """

    model: nn.Module  # in the trainer, the DDP wrapper when distributed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    precision: str = "fp32"
    optimizer_name: str = ""

    def __call__(self, batch: Any, lap: Callable[[str], None] = no_lap) -> dict[str, torch.Tensor]:
        with self.autocast():
            losses = self.model(batch)
        total = sum(losses.values())
        lap("forward")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            total.backward()
            lap("backward")
            self.optimizer.step()
        else:
            self.scaler.scale(total).backward()
            lap("backward")
            self.scaler.step(self.optimizer)  # skipped when the unscaled gradients hold inf/nan
            self.scaler.update()
        lap("optimizer")
        return {name: loss.detach() for name, loss in losses.items()}

    def loss_scale(self) -> torch.Tensor | None:
        """fp16: the scaler's current scale as a device tensor (None without a scaler).

        `GradScaler.get_scale()` reads it with `.item()`, which waits for the device; scaling a
        one on the device reads it without waiting (and creates the scale, as the first step would).
        """
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), device=self.device))

    @property
    def description(self) -> str:
        """Precision and optimizer, for the log."""
        return f"precision {self.precision}; {self.optimizer_name}"

    @property
    def graph_replays(self) -> int:
        """How many times the static part has replayed a captured graph so far (a host-side count)."""
        return getattr(self.model, "module", self.model).static_part.replays


def build_training_step(cfg: Config, device: torch.device, model: nn.Module) -> TrainingStep:
    """The step as the trainer runs it: `train.precision` resolved for `device`, its scaler and autocast, the optimizer."""
    precision = resolve_precision(cfg.train.precision, device)
    scaler = make_grad_scaler(precision, device)
    optimizer, optimizer_name = build_optimizer(model, cfg.solver, device, grad_scaling=scaler is not None)
    autocast = step_autocast(precision, device, cuda_graphs=cfg.train.cuda_graphs)
    return TrainingStep(model, optimizer, scaler, autocast, device, precision, optimizer_name)


def seed_step(step_seed: tuple[int, ...], iteration: int) -> None:
    """Seed torch's generator for step `iteration` from (*step_seed, iteration).

    Then the step's random draws (proposal sampling) do not depend on what else used the
    generator: a resumed run draws exactly what the uninterrupted one did, whatever its input
    pipeline does.
    """
    torch.manual_seed(derived_seed(*step_seed, iteration))


@dataclass
class LoggedStep:
    iteration: int  # 1-based count of steps done
    losses: dict[str, float]
    total: float
    lr: float
    skipped: bool  # fp16: the scaler skipped this step's update

    @property
    def finite(self) -> bool:
        """Whether every loss of the step is finite (a NaN or inf in any one makes the total so)."""
        return math.isfinite(self.total)


class LossReadback:
    """Per-step losses kept on the device and copied to the host in one transfer."""

    def __init__(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._meta: list[tuple[int, float]] = []
        self._names: list[str] = []

    def add(
        self,
        iteration: int,
        losses: dict[str, torch.Tensor],
        lr: float,
        scale_before: torch.Tensor | None = None,
        scale_after: torch.Tensor | None = None,
    ) -> None:
        """One step's losses; fp16 also the loss scale before and after the step (`TrainingStep.loss_scale`)."""
        self._names = list(losses)
        values = [loss.float() for loss in losses.values()]
        if scale_before is not None:
            # the scaler lowers its scale exactly when it skips a step
            values += [scale_before.float(), scale_after.float()]
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
        if step.finite:
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


@dataclass
class EpochLoop:
    """What `train_one_epoch` does around each step, the same for every epoch of a run.

    Every `readback_every` steps (and before each checkpoint) the losses are read back,
    checked by `guard` and handed to `on_logged` (progress bar, metrics file).
    `save_checkpoint` is called every `checkpoint_every` steps, after that check, when every
    parameter is finite. With `step_seed` (e.g. (seed, rank)) each step is seeded by
    `seed_step`. When the ranks agree to `stop` (a signal), the step's checkpoint is saved and
    TrainingStopped raised. `poll()` is called on every rank at the read-back points (unless
    stopping): True ends the epoch there (an evaluation beside training reached the quality
    target: the run is over, nothing more is saved); if it raises (that evaluation was lost),
    the step's checkpoint is saved first.
    """

    step: TrainingStep
    solver_cfg: Any
    guard: NonFiniteGuard
    readback_every: int
    global_batch: int  # images per step over all ranks
    max_iter: int
    step_seed: tuple[int, ...] | None = None
    save_checkpoint: Callable[[], None] | None = None
    checkpoint_every: int = 0
    on_logged: Callable[[list[LoggedStep]], None] = lambda steps: None
    stop: StopRequest | None = None
    poll: Callable[[], bool] | None = None


def _logging_first(batches: Iterable[Any], read_back: Callable[[], None]) -> Iterator[Any]:
    """`batches`; if a loader worker dies, the steps done so far are read back (logged, checked) before the
    error goes on to main, which keeps them in a checkpoint."""
    try:
        yield from batches
    except LoaderWorkerLost:
        read_back()
        raise


def train_one_epoch(loop: EpochLoop, batches: Iterable[Any], state: TrainState) -> bool:
    """Step through `batches` until it ends or `loop.max_iter` steps are done; True if it ended.

    The loop leaves right after the step that reaches `max_iter`, so the pipeline's position
    is that step's (a run extended on resume continues from there).
    """
    step, model = loop.step, loop.step.model
    model.train()
    readback = LossReadback()
    started = time.perf_counter()

    def read_back() -> None:
        steps = readback.flush()
        state.skipped_steps += sum(logged.skipped for logged in steps)
        loop.on_logged(steps)
        for logged in steps:
            loop.guard.check(logged)

    def target_reached() -> bool:
        try:
            return loop.poll()
        except Exception:
            if loop.save_checkpoint is not None and parameters_are_finite(model):
                loop.save_checkpoint()  # whatever failed beside training, the steps since the last checkpoint are kept
            raise

    ended = True
    for batch in _logging_first(batches, read_back):
        lr = set_learning_rate(step.optimizer, loop.solver_cfg, state.iteration)
        if loop.step_seed is not None:
            seed_step(loop.step_seed, state.iteration)
        scale_before = step.loss_scale()
        losses = step(batch)
        state.iteration += 1
        state.images_seen += loop.global_batch
        readback.add(state.iteration, losses, lr, scale_before, step.loss_scale())
        checkpoint_due = (
            loop.save_checkpoint is not None and loop.checkpoint_every and state.iteration % loop.checkpoint_every == 0
        )
        readback_due = len(readback) >= loop.readback_every or checkpoint_due
        stopping = loop.stop.agreed(at_readback=readback_due) if loop.stop is not None else None
        if readback_due or stopping:
            read_back()
        if readback_due and not stopping and loop.poll is not None and target_reached():
            ended = False
            break
        saving = (checkpoint_due or stopping) and loop.save_checkpoint is not None
        if saving and parameters_are_finite(model):
            loop.save_checkpoint()  # never over finite weights with NaN ones: the last good one stays
        if stopping:
            state.train_seconds += time.perf_counter() - started
            raise TrainingStopped(*stopping, iteration=state.iteration)  # main adds the checkpoint
        if state.iteration >= loop.max_iter:
            ended = False
            break
    read_back()
    state.train_seconds += time.perf_counter() - started
    return ended
