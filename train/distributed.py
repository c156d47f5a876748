"""Process group setup from torchrun's environment, read once at entry, and its timeouts.

`torchrun --nproc_per_node=N` (and multi-node rendezvous) sets RANK, WORLD_SIZE and
LOCAL_RANK, and TORCHELASTIC_RESTART_COUNT when it restarted the workers; a plain
`python train/main.py` has none of them and runs as rank 0 of 1. NCCL joins GPU processes,
gloo CPU ones. Only rank 0 writes logs and checkpoints.

A rank that stops answering must end the job, not hang it (`train.collective_timeout_s`):
- `LivenessWatch` names a frozen process (SIGSTOP, a hung host) within half the timeout;
- the process group's own timeout is the backstop for a live process stuck in a collective:
  gloo raises in the waiting call; NCCL's watchdog tears the process down
  (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, torch's default since 2.2, set here for older ones).
  Its message names the collective, not the late rank; TORCH_NCCL_DESYNC_DEBUG=1 adds which
  ranks did not join, at the price of a store write per collective, so it is left to the user.
"""

from __future__ import annotations

import inspect
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.epoch_plan import derived_seed
from train.config import Config, ConfigError
from train.config_schema import DEVICES


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    restart_count: int = 0  # torchrun's restarts of this job so far (0: the first start)

    @property
    def is_main(self) -> bool:
        """The one process that writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int) -> torch.device:
    """auto -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if preference not in DEVICES:
        raise ConfigError(f"train.device must be one of {', '.join(DEVICES)}, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available on this machine; use train.device=auto or cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(
    device_preference: str = "auto", env: Mapping[str, str] | None = None, *, collective_timeout_s: float | None = None
) -> DistributedContext:
    """Join the process group torchrun describes (none for a single process).

    With `collective_timeout_s`, a collective that waits longer fails (gloo) or tears the
    process down (NCCL's watchdog), and a `LivenessWatch` names a rank that stops answering.
    """
    env = os.environ if env is None else env
    rank = int(env.get("RANK", 0))
    world_size = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    restart_count = int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = DistributedContext(rank, world_size, local_rank, device, restart_count)
    if world_size > 1 and not dist.is_initialized():
        store = join_process_group(rank, world_size, device, collective_timeout_s)
        if collective_timeout_s:
            global _watch
            _watch = LivenessWatch(ctx, store, collective_timeout_s)
    return ctx


def configure_torch(train_cfg: Config, seed: int, rank: int) -> None:
    """Threads, denormals, determinism and seeds (each rank its own stream, reproducible per rank)."""
    # On the CPU, near-zero gradients (the reference's N(0, 0.001) box-delta init makes many)
    # are denormal floats, which cost the FPU ~100x: flushing them halves a CPU training step.
    # Set before the first parallel op: OpenMP's threads copy the flag from this thread when
    # they start, and never again.
    torch.set_flush_denormal(True)
    if train_cfg.num_threads > 0:
        torch.set_num_threads(train_cfg.num_threads)
    torch.use_deterministic_algorithms(train_cfg.deterministic)
    # static bucket shapes make cudnn's autotuning pay off; it is not deterministic
    torch.backends.cudnn.benchmark = not train_cfg.deterministic
    process_seed = rank_seed(seed, rank)
    random.seed(process_seed)
    np.random.seed(process_seed)
    torch.manual_seed(process_seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of this process's global generators: the run's seed itself on rank 0 (so a
    single-process run is seeded exactly by `seed`), `derived_seed(seed, rank)` on the others."""
    return seed if rank == 0 else derived_seed(seed, rank)


def per_rank_batch(global_batch: int, world_size: int, key: str) -> int:
    """The images each process takes of a global batch (`key` names it in the error)."""
    if global_batch % world_size:
        raise ConfigError(f"{key}={global_batch} is not divisible by the {world_size} processes; pick a multiple")
    return global_batch // world_size


def gather_from_ranks(ctx: DistributedContext, value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not ctx.is_distributed:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def join_process_group(
    rank: int, world_size: int, device: torch.device, collective_timeout_s: float | None = None
) -> dist.Store:
    """NCCL for GPU processes, bound to this process's GPU (its communicator is made now, so a
    broken NCCL setup fails here, not at the first collective); gloo for CPU ones. Returns the
    store the group was set up through (MASTER_ADDR/MASTER_PORT; under torchrun its agent hosts
    it), which the liveness watch shares.

    `collective_timeout_s` (None or 0: torch's defaults) bounds every collective.
    """
    timeout = timedelta(seconds=collective_timeout_s) if collective_timeout_s else None
    store = rendezvous_store(rank, world_size, timeout)
    if device.type == "cuda":
        # read when the NCCL process group is created: a timed-out collective ends the process
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        dist.init_process_group(
            "nccl", store=store, rank=rank, world_size=world_size, device_id=device, timeout=timeout
        )
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    return store


def rendezvous_store(rank: int, world_size: int, timeout: timedelta | None = None) -> dist.Store:
    """The key-value store every process of the job reaches, by torch's `env://` rendezvous: the
    one `init_process_group` would make itself, kept here so the liveness watch can use it too."""
    kwargs = {"timeout": timeout} if timeout is not None else {}
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, **kwargs))
    return store


def data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over the process group, one device per process.

    DDP broadcasts rank 0's buffers before every forward unless told not to: a collective per
    step. Frozen BN statistics and the input normalization's constants never change, so only a
    model with trainable BatchNorm layers (whose running statistics each rank updates) pays it.
    """
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    changing_buffers = any(isinstance(m, batch_norms) and m.track_running_stats for m in model.modules())
    device_ids = [device.index] if device.type == "cuda" else None
    # torch 2.14 renamed the flag (broadcast_buffers warns there); the new one also syncs once at init,
    # which equal buffers do not mind. Older torch (the GPU machine's 2.11) knows only the old name.
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=device_ids, **{sync: changing_buffers})


def shutdown_distributed() -> None:
    global _watch
    if _watch is not None:
        _watch.stop()  # before the store goes: a peer's exit is not a frozen peer
        _watch = None
    if dist.is_initialized():
        dist.destroy_process_group()


class LivenessWatch:
    """Ends this process, naming the rank, when another process of the job stops answering.

    A frozen process (SIGSTOP, a hung host) never fails a collective: its peers just wait.
    A daemon thread on each rank beats into the store every `timeout_s / 10` s; rank 0 watches
    every other rank's beat, the others watch rank 0's (so the store sees O(ranks) requests).
    A beat that has not moved for `timeout_s / 2` s calls `on_silent` with one sentence naming
    the rank; by default that prints it and exits with code 1, so that `torchrun
    --max-restarts` restarts the job, which then resumes. The thread runs beside the main
    thread, so a long evaluation or checkpoint write is no silence: only a process whose
    threads all stopped is.
    """

    def __init__(
        self,
        ctx: DistributedContext,
        store: dist.Store,
        timeout_s: float,
        on_silent: Callable[[str], None] | None = None,
    ):
        self.ctx = ctx
        self.store = store
        self.timeout_s = timeout_s
        self.interval = timeout_s / 10
        self.silent_after = timeout_s / 2
        self.on_silent = on_silent or _end_process
        self._prefix = f"maskrcnn/alive/{ctx.restart_count}"
        self._stopped = threading.Event()
        watched = range(1, ctx.world_size) if ctx.is_main else [0]
        now = time.monotonic()
        self._seen: dict[int, tuple[bytes | None, float]] = {rank: (None, now) for rank in watched}
        self._thread = threading.Thread(target=self._run, name="liveness-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        beat = 0
        while not self._stopped.wait(self.interval):
            beat += 1
            try:
                self.store.set(f"{self._prefix}/{self.ctx.rank}", str(beat))
                self._look()
            except Exception:  # a store that does not answer is silence too; _look() judges it by time
                self._judge(time.monotonic())

    def _look(self) -> None:
        now = time.monotonic()
        for rank, (value, since) in self._seen.items():
            key = f"{self._prefix}/{rank}"
            current = self.store.get(key) if self.store.check([key]) else None
            if current != value:
                self._seen[rank] = (current, now)
        self._judge(now)

    def _judge(self, now: float) -> None:
        silent = [rank for rank, (_, since) in self._seen.items() if now - since >= self.silent_after]
        if silent and not self._stopped.is_set():
            self._stopped.set()
            ranks = ", ".join(map(str, silent))
            self.on_silent(
                f"rank {self.ctx.rank}: rank {ranks} stopped answering (no sign of life for "
                f"{self.silent_after:g} s: frozen, stopped, or its host unreachable), so the job ends; "
                f"train.collective_timeout_s={self.timeout_s:g} sets this limit"
            )


def _end_process(sentence: str) -> None:
    """The main thread may be blocked inside a collective for good: leave from here."""
    print(f"error: {sentence}", file=sys.stderr, flush=True)
    os._exit(1)


_watch: LivenessWatch | None = None


def broadcast_from_main(ctx: DistributedContext, value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the evaluation result that decides whether to stop)."""
    if not ctx.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
