"""Timing without disturbing what is timed: the clocks of the dry runs, tools/gpu_check.py and tools/bench_*.py.

Nothing here waits for the device inside a timed run: on CUDA `timed_seconds` reads two CUDA
events recorded around the queued work, as the training loop runs it. `synchronize` is the
one place that waits for the device, for clocks that must include the device's work up to
a point (`StageClock` laps, `measure_rate` around a batch stream).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from pipeline.loader import StageTimer
from train.engine import LossReadback, no_lap

log = logging.getLogger(__name__)

WARMUP_ITERS = 3
BREAKDOWN_ITERS = 3  # extra steps for the per-stage view (each synchronizes the device at every stage)

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    """Wait until `device` has done the work queued so far (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU time of this process (DALI's threads included) and of its child processes (DataLoader workers).

    Live children are read from /proc (Linux); children that already exited count through
    getrusage. Elsewhere only this process and its exited children count.
    """
    total = time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total += children.ru_utime + children.ru_stime
    task_dir = Path(f"/proc/{os.getpid()}/task")
    if not task_dir.is_dir():
        return total
    ticks = os.sysconf("SC_CLK_TCK")
    for task in task_dir.iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited in between: counted by getrusage once reaped
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat)
    return total


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


class StageClock:
    """Seconds per named stage; `lap` syncs the device at each boundary so GPU time lands in its stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now

    def restart(self) -> None:
        synchronize(self.device)
        self.seconds.clear()
        self._last = time.perf_counter()


def measure(
    name: str,
    step: Callable[[Callable[[str], None]], dict[str, torch.Tensor]],
    *,
    iters: int,
    images_per_iter: int,
    device: torch.device,
    warmup: int = WARMUP_ITERS,
    breakdown: int = BREAKDOWN_ITERS,
    replays: Callable[[], int] | None = None,
    trace: StageTimer | None = None,
) -> dict[str, Any]:
    """`step(lap)` `warmup` times untimed, `iters` times timed (images/s), then `breakdown` times
    with a synchronizing `lap` for the per-stage breakdown. With `replays` (a CUDA-graph replay
    count, such as `TrainingStep.graph_replays`) also the replays per step. `trace` (a timer)
    traces the timed steps only (train/trace.py).

    `step` returns its losses, still on the device (as `TrainingStep` does). The timed steps'
    losses stay there as the training loop keeps them (`LossReadback`), are read back once the
    clock has stopped, and are reported per step: `losses`, `nonfinite_steps` (1-based) and
    `losses_finite`. Nothing here raises on them: the caller decides, with the figures in hand.
    Each step is logged as it ends (as it is queued, on CUDA), so a long run shows progress.
    """
    replays_before = replays() if replays else 0
    started = time.perf_counter()

    def progress(phase: str, done: int, of: int) -> None:
        log.info("dry run %s: %s step %d/%d at %.1f s", name, phase, done, of, time.perf_counter() - started)

    for i in range(warmup):
        step(no_lap)
        progress("warm-up", i + 1, warmup)
    readback = LossReadback()

    def timed_steps() -> None:
        with tracing(trace):
            for i in range(iters):
                readback.add(i + 1, step(no_lap), math.nan)  # no schedule here: the LR column stays empty
                progress("timed", i + 1, iters)

    seconds, cpu_time = timed_seconds(timed_steps, device)
    logged = readback.flush()
    clock = StageClock(device)
    clock.restart()
    for i in range(breakdown):
        step(clock.lap)
        progress("breakdown", i + 1, breakdown)
    images = iters * images_per_iter
    result = {
        "images_per_s": images / seconds,
        "iters": iters,
        "images_per_iter": images_per_iter,
        "seconds": seconds,
        "cpu_ms_per_image": 1000.0 * cpu_time / images,
        "stages_s_per_iter": {stage: s / max(breakdown, 1) for stage, s in clock.seconds.items()},
        "losses": [{**logged_step.losses, "total": logged_step.total} for logged_step in logged],
        "nonfinite_steps": [logged_step.iteration for logged_step in logged if not logged_step.finite],
    }
    result["losses_finite"] = not result["nonfinite_steps"]
    if replays:
        result["graph_replays_per_step"] = (replays() - replays_before) / (warmup + iters + breakdown)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    stages = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["stages_s_per_iter"].items())
    log.info("dry run %-8s %8.2f images/s  (synchronized breakdown: %s per iteration)", name, result["images_per_s"], stages)
    if not result["losses_finite"]:
        log.warning("dry run %s: non-finite losses at timed steps %s", name, result["nonfinite_steps"])
    return result


def endless(epochs: Callable[[int], Iterable[T]]) -> Iterator[T]:
    """Epoch 0, 1, 2, ... of `epochs(epoch)`, one after the other, for as long as the caller pulls."""
    for epoch in itertools.count():
        yield from epochs(epoch)


def measure_rate(
    batches: Iterator[Any], images_in: Callable[[Any], int], *, warmup: int, iters: int, device: torch.device
) -> dict[str, float]:
    """images/s and CPU ms per image over `iters` batches pulled after `warmup` batches."""
    for _ in range(warmup):
        next(batches)
    synchronize(device)
    images, start, cpu_start = 0, time.perf_counter(), cpu_seconds()
    for _ in range(iters):
        images += images_in(next(batches))
    synchronize(device)
    seconds = time.perf_counter() - start
    cpu_ms = 1000.0 * (cpu_seconds() - cpu_start) / images
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "cpu_ms_per_image": cpu_ms}


def loader_epochs(loader: Any) -> Callable[[int], Iterable[Any]]:
    """`epochs` for `endless`: the loader set to each epoch in turn."""

    def epoch(e: int) -> Iterable[Any]:
        loader.set_epoch(e)
        return loader

    return epoch


@contextmanager
def tracing(timer: StageTimer | None) -> Iterator[None]:
    """`timer` keeps its spans inside the block (train/trace.py); None: nothing."""
    if timer is None:
        yield
        return
    timer.tracing = True
    try:
        yield
    finally:
        timer.tracing = False


def loader_rate(loader: Any, *, warmup: int, iters: int, device: torch.device, trace: bool = False) -> dict[str, Any]:
    """A loader's rate (`measure_rate`) and its per-stage wall-clock breakdown (pipeline/loader.py `StageTimer`);
    with `trace`, its timer keeps the measured batches' spans."""
    batches = endless(loader_epochs(loader))
    for _ in range(warmup):
        next(batches)
    before = loader.timings()["total_s"]
    with tracing(loader.timer if trace else None):
        rate = measure_rate(batches, len, warmup=0, iters=iters, device=device)
    after = loader.timings()["total_s"]
    stages = {s: None if t is None else 1000.0 * (t - before[s]) / rate["images"] for s, t in after.items()}
    return {**rate, "stage_ms_per_image": stages, "batches_per_epoch": len(loader)}
