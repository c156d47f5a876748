"""Stopping on SIGTERM, SIGHUP or Ctrl-C: a checkpoint at the next step boundary, then a clean exit.

Schedulers send SIGTERM some time before SIGKILL (Slurm, Kubernetes: 30 s by default), a
terminal's Ctrl-C sends SIGINT to every process of the job, and a dropped SSH session sends
SIGHUP to the processes of its terminal (handled as SIGTERM). The handler only records the
signal; the training loop asks `StopRequest.agreed()` at its step boundaries, saves a
checkpoint and raises `TrainingStopped`. A signal may reach one rank only, so several
processes agree through one small all_reduce at the loss read-back points (which wait for the
device anyway): every rank stops after the same step, within `train.loss_readback_every`
steps of the signal. One process checks after every step. A second Ctrl-C stops at once,
without saving; a copy that arrives within REPEAT_S of the first is not a second press:
torchrun's agent forwards the signal that the terminal already sent to every worker.
Under torchrun the agent SIGKILLs workers still running 30 s after it forwarded the signal,
so `train.loss_readback_every` steps and a checkpoint write must take less than that.

The process exits with 128 + the signal's number (143 after SIGTERM, 129 after SIGHUP, 130 after
Ctrl-C), the code a shell gives a process that a signal ended, so a scheduler still sees an
interrupted job.

The tools (predict, evaluate, shard_coco) have no checkpoint to write: under `signals_interrupt()`
any of the three signals raises `Interrupted` where the tool is, which keeps what it finished (or
removes what it half wrote) and says so in one sentence.

Helper processes (mask encoding, COCOeval) leave the terminal's signals to their parent
(`leave_terminal_signals_to_parent`) and die with it (`follow_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Generic, Iterable, Iterator, TypeVar

if TYPE_CHECKING:  # torch only where ranks agree: the tools (shard_coco) import this module without it
    from train.distributed import DistributedContext

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
T = TypeVar("T")
REPEAT_S = 1.0  # a second SIGINT sooner than this after the first is torchrun forwarding it
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def leave_terminal_signals_to_parent() -> None:
    """For a helper process (mask encoding, COCOeval): Ctrl-C and a terminal's hang-up reach every
    process of the terminal's group, and are the parent's to handle: it decides how to stop and ends
    its helpers. A helper killed inside a task would leave its parent waiting for the result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def follow_parent(parent_pid: int) -> None:
    """For a helper process: die with its parent (PR_SET_PDEATHSIG, Linux; elsewhere the parent's shutdown ends it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class TrainingStopped(Exception):
    """The ranks agreed to stop on a signal; `checkpoint` is the run's newest (None: none yet)."""

    def __init__(
        self, signum: int, ranks: list[int], *, iteration: int, checkpoint: Path | None = None, world_size: int = 1
    ):
        super().__init__(signum, ranks, iteration)
        self.signum, self.ranks, self.iteration = signum, ranks, iteration
        self.checkpoint, self.world_size = checkpoint, world_size

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def sentence(self) -> str:
        name = signal.Signals(self.signum).name
        where = f" (received by rank {', '.join(map(str, self.ranks))})" if self.world_size > 1 else ""
        kept = f"its newest checkpoint is {self.checkpoint}" if self.checkpoint else "no checkpoint was written yet"
        return f"stopped by {name}{where} after iteration {self.iteration}; {kept}: continue with --resume"


class StopRequest:
    """Records SIGTERM/SIGHUP/SIGINT while installed; `agreed()` says, identically on every rank, whether to stop."""

    def __init__(self, ctx: DistributedContext, readback_every: int):
        self.ctx = ctx
        self.readback_every = readback_every
        self.signum = 0
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a caller elsewhere keeps its own handling
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            if signum == signal.SIGINT and time.monotonic() - self._received_at >= REPEAT_S:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
            return
        self.signum, self._received_at = signum, time.monotonic()
        when = "after this step" if not self.ctx.is_distributed else f"within {self.readback_every} steps"
        log.warning(
            "%s received: stopping %s with a checkpoint (Ctrl-C again stops at once, without saving)",
            signal.Signals(signum).name, when,
        )

    def agreed(self, at_readback: bool) -> tuple[int, list[int]] | None:
        """(signal, ranks that received it) when the ranks stop here, else None.

        Every rank must call it with the same `at_readback`; with several ranks it only
        decides (one all_reduce) at read-back points.
        """
        if not self.ctx.is_distributed:
            return (self.signum, [0]) if self.signum else None
        if not at_readback:
            return None
        import torch
        import torch.distributed as dist

        flags = torch.zeros(self.ctx.world_size, dtype=torch.int32, device=self.ctx.device)
        flags[self.ctx.rank] = self.signum
        dist.all_reduce(flags)
        received = [(rank, signum) for rank, signum in enumerate(flags.tolist()) if signum]
        return (received[0][1], [rank for rank, _ in received]) if received else None


class Interrupted(BaseException):
    """SIGTERM, SIGHUP or SIGINT under `signals_interrupt()`; `kept` says what the tool finished and wrote, if anything.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on its way (a file
    reader turning errors into sentences) mistakes it for a failure of the work it interrupted.
    """

    def __init__(self, signum: int, kept: str = ""):
        super().__init__(signum, kept)
        self.signum, self.kept = signum, kept

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def sentence(self, rerun: str) -> str:
        return f"stopped by {signal.Signals(self.signum).name}; {self.kept or 'nothing was written'}: {rerun}"


class SignalStop:
    """What `signals_interrupt()` yields: `check()` at the work's boundaries raises `Interrupted` once a signal came."""

    def __init__(self) -> None:
        self.signum = 0

    def check(self) -> None:
        if self.signum:
            raise Interrupted(self.signum)

    def each(self, items: Iterable[T]) -> "Checked[T]":
        """`items` (a loader's batches) with `check()` before each one; `len()` is the loader's."""
        return Checked(items, self)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler `signals_interrupt()` installs: note the first signal and interrupt the work."""
        self.signum = self.signum or signum
        raise Interrupted(self.signum)


class Checked(Generic[T]):
    def __init__(self, items: Iterable[T], stop: SignalStop):
        self.items, self.stop = items, stop

    def __iter__(self) -> Iterator[T]:
        for item in self.items:
            self.stop.check()
            yield item

    def __len__(self) -> int:  # a loader's batches per pass: the evaluation's progress lines give an ETA by it
        return len(self.items)  # type: ignore[arg-type]


@contextmanager
def signals_interrupt() -> Iterator[SignalStop]:
    """While inside, SIGTERM, SIGHUP and SIGINT raise `Interrupted` where the main thread is (Python runs handlers there).

    Where Python drops exceptions (a `__del__`, an at-fork callback: the loader's workers start
    so) it would print this one as a traceback and go on: the hook keeps it quiet, and the next
    `check()` raises it.
    """
    stop = SignalStop()
    previous_hook = sys.unraisablehook

    def drop_quietly(unraisable: "sys.UnraisableHookArgs") -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            previous_hook(unraisable)

    previous = {signum: signal.signal(signum, stop.handle) for signum in SIGNALS}
    sys.unraisablehook = drop_quietly
    try:
        yield stop
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
