"""What a run reports while it trains: plain log lines, a progress bar on terminals, JSON lines, TensorBoard.

Rank 0 only (other ranks build a `RunReporter` with `enabled=False`). Every time the losses are
read back (`train.loss_readback_every` steps) it logs one plain line, the form cluster logs
want: iteration, losses, learning rate, images/s, the time spent waiting for data (from the
loader's own timings), the peak GPU memory, and the ETA of the whole run (the remaining
iterations at the recent pace, plus the evaluations still due at their measured duration).
The tqdm bar is drawn only when stdout is a terminal: redirected to a file, a bar is just
`\\r` noise. `<output_dir>/metrics.jsonl` gets one record per step and per evaluation;
TensorBoard scalars go to `<output_dir>/tensorboard` when the optional `tensorboard` package
is installed (`pip install -e '.[tensorboard]'`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from train.config import Config
from train.engine import LoggedStep

log = logging.getLogger(__name__)


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(folder))


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`: how a person reads an ETA."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class RunPlan:
    """How long the run is, for its ETA: it ends at `total_iterations` unless the target stops it first."""

    total_iterations: int
    iterations_per_epoch: int
    eval_every_epochs: int  # 0: no evaluation

    @classmethod
    def of(cls, cfg: Config, iterations_per_epoch: int) -> "RunPlan":
        iterations_per_epoch = max(iterations_per_epoch, 1)
        total = min(cfg.solver.max_iter, cfg.train.max_epochs * iterations_per_epoch)
        return cls(total, iterations_per_epoch, cfg.eval.every_epochs)

    def evaluations_after(self, iteration: int) -> int:
        """Evaluations still due once `iteration` steps are done (after every N epochs and after the last)."""
        if self.eval_every_epochs == 0:
            return 0
        last_epoch = math.ceil(self.total_iterations / self.iterations_per_epoch)
        done_epochs = iteration // self.iterations_per_epoch
        return sum(1 for e in range(done_epochs + 1, last_epoch + 1) if e % self.eval_every_epochs == 0 or e == last_epoch)


class RunReporter:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        global_batch: int,
        plan: RunPlan | None = None,
        data_timings: Callable[[], dict[str, Any]] | None = None,
        show_bar: bool | None = None,
    ):
        """`data_timings`: the loader's `timings()` (its `wait` total is the data wait); `show_bar`
        None: a bar when stdout is a terminal."""
        self.enabled = enabled
        self.global_batch = global_batch
        self.plan = plan
        self._data_timings = data_timings
        self._show_bar = sys.stdout.isatty() if show_bar is None else show_bar
        self._bar: tqdm | None = None
        self._last_time = time.perf_counter()
        self._last_wait = self._data_wait()
        self._epoch_ended: float | None = None
        self._eval_seconds: list[float] = []
        self._jsonl = None
        self._tensorboard = None
        if enabled:
            output_dir = Path(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(output_dir / "metrics.jsonl", "a")
            self._tensorboard = _tensorboard_writer(output_dir / "tensorboard")

    def start_epoch(self, epoch: int, total_steps: int) -> None:
        if not self.enabled:
            return
        if self._show_bar:
            # On stdout, with the log lines (stderr is for the one-sentence errors).
            self._bar = tqdm(total=total_steps, desc=f"epoch {epoch + 1}", unit="it", dynamic_ncols=True, file=sys.stdout)
        self._last_time = time.perf_counter()
        self._last_wait = self._data_wait()
        self._epoch_ended = None

    def steps(self, steps: list[LoggedStep]) -> None:
        """Losses read back from the device: one plain line, one JSON record per step, one bar update."""
        if not self.enabled or not steps:
            return
        now, wait = time.perf_counter(), self._data_wait()
        seconds = max(now - self._last_time, 1e-9)
        images_per_s = len(steps) * self.global_batch / seconds
        waited = wait - self._last_wait if wait >= self._last_wait else wait  # the loader may reset its timer
        data_ms = 1000.0 * waited / len(steps)
        self._last_time, self._last_wait = now, wait
        last = steps[-1]
        for step in steps:
            self.write({"iteration": step.iteration, "loss": step.total, "lr": step.lr, "skipped": step.skipped, **step.losses})
        memory = _max_gpu_memory_gib()
        scalars = {"loss": last.total, "lr": last.lr, "images_per_s": images_per_s, "data_wait_ms": data_ms, **last.losses}
        if memory is not None:
            scalars["max_memory_gib"] = memory
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(f"train/{name}", value, last.iteration)
        self._log(self._line(last, images_per_s, data_ms, seconds / len(steps), memory))
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{last.total:.3f}", lr=f"{last.lr:.4g}", img_s=f"{images_per_s:.1f}")
            self._bar.update(len(steps))

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._epoch_ended = time.perf_counter()

    def evaluation(self, epoch: int, iteration: int, results: dict[str, Any], timing: dict[str, float] | None = None) -> None:
        """One epoch's result; `timing`: what it cost the training (train/async_evaluation.py `Evaluation.timing`)."""
        if not self.enabled:
            return
        if timing is not None:  # beside training: what it cost the training, not the wall-clock until its result
            self._eval_seconds.append(timing["wait_s"])
        elif self._epoch_ended is not None:  # the evaluation ran between the epoch's end and now
            self._eval_seconds.append(time.perf_counter() - self._epoch_ended)
        self.write({"epoch": epoch, "iteration": iteration, "eval": results, **({"timing": timing} if timing else {})})
        if self._tensorboard is not None:
            for kind, stats in results.items():
                for name, value in stats.items():
                    self._tensorboard.add_scalar(f"eval/{kind}_{name}", value, iteration)

    def write(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        self.end_epoch()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def eta_seconds(self, iteration: int, seconds_per_iteration: float) -> float | None:
        """The rest of the run: iterations at `seconds_per_iteration`, evaluations at their mean so far."""
        if self.plan is None:
            return None
        remaining = max(self.plan.total_iterations - iteration, 0) * seconds_per_iteration
        if self._eval_seconds:
            remaining += self.plan.evaluations_after(iteration) * sum(self._eval_seconds) / len(self._eval_seconds)
        return remaining

    def _line(self, step: LoggedStep, images_per_s: float, data_ms: float, seconds_per_iteration: float, memory: float | None) -> str:
        total = f"/{self.plan.total_iterations}" if self.plan is not None else ""
        losses = " ".join(f"{name.removeprefix('loss_')} {value:.3f}" for name, value in step.losses.items())
        parts = [f"iter {step.iteration}{total}", f"loss {step.total:.3f} ({losses})", f"lr {step.lr:.4g}", f"{images_per_s:.1f} img/s"]
        if self._data_timings is not None:
            parts.append(f"data wait {data_ms:.0f} ms/it")
        if memory is not None:
            parts.append(f"max mem {memory:.1f} GiB")
        eta = self.eta_seconds(step.iteration, seconds_per_iteration)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return "  ".join(parts)

    def _log(self, line: str) -> None:
        if self._bar is None:
            log.info(line)
            return
        with logging_redirect_tqdm():  # printed above the bar, which is then redrawn
            log.info(line)

    def _data_wait(self) -> float:
        if self._data_timings is None:
            return 0.0
        return float(self._data_timings()["total_s"].get("wait") or 0.0)


def _max_gpu_memory_gib() -> float | None:
    """Peak memory the CUDA caching allocator handed out on this device, once CUDA is in use."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**30
