"""What the DALI and torch backends share: the Loader contract's bookkeeping (pipeline/loader.py).

`LoaderBase` holds the constructor's fields, the epoch and the position within it, the resume
point loaded but not iterated yet, the stage timer, and the side stream the batches are copied
to the device on, with the hand-over of a batch from that stream to the consumer's. A backend
only says how an epoch's batches are made from a start position (`_epoch_batches`): both
replay the epoch plan (pipeline/epoch_plan.py) from there, so the epoch and the position are the
whole mid-epoch state.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any, Iterator

import torch

from pipeline.batch import Batch
from pipeline.epoch_plan import epoch_plan, group_batches
from pipeline.settings import LoaderSettings
from pipeline.shard_set import ShardSet
from pipeline.timing import StageTimer


class LoaderBase:
    """Iterable over `Batch` for one rank; see pipeline/loader.py for the contract."""

    HIDDEN_STAGES: tuple[str, ...] = ()  # stages the backend cannot time from Python (pipeline/timing.py)

    def __init__(
        self,
        shard_set: ShardSet,
        settings: LoaderSettings,
        *,
        training: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
    ):
        self.shard_set = shard_set
        self.manifest = shard_set.manifest
        self.settings = settings
        self.training = training
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = device
        self.decode_on_device = device.type == "cuda" and settings.decode_device != "cpu"
        self.batches = group_batches(shard_set.samples, world_size, batch_size)
        self.timer = StageTimer(hidden=self.HIDDEN_STAGES)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Ground truth never exceeds these per image (pipeline/collate.py pads per batch up to them).
        self.maxima = tuple(max(m, 1) for m in (shard_set.max_instances, shard_set.max_polygons, shard_set.max_vertices))
        self._epoch = 0
        self._position = 0  # batches of the current epoch already handed out
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return sum(self.batches.values())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields; keeps a loaded resume point for that same epoch."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        self._epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the batches already yielded in it: enough to continue it exactly."""
        if self._resume is not None:  # loaded but not iterated yet
            return dict(self._resume)
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration continues epoch `state['epoch']` after its first `position` batches."""
        self._resume = dict(state)
        self._epoch = state["epoch"]

    def timings(self) -> dict[str, object]:
        return self.timer.report()

    def __iter__(self) -> Iterator[Batch]:
        resume, self._resume = self._resume, None
        start = resume["position"] if resume is not None else 0
        self._position = start
        for batch in self._epoch_batches(self._epoch, start):
            self.timer.count(len(batch))
            self._position += 1
            yield batch

    def _plan(self, epoch: int) -> list[list[tuple[str, int, bool]]]:
        """This rank's batches of `epoch` as (group, sample position, flip) entries (pipeline/epoch_plan.py)."""
        return epoch_plan(
            self.shard_set,
            training=self.training,
            flip_prob=self.settings.flip_prob,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
        )

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        """Batches `start`, `start + 1`, ... of `epoch` (a resume starts past 0)."""
        raise NotImplementedError

    def _on_copy_stream(self) -> AbstractContextManager:
        """Where a batch's device work runs: the side stream on CUDA (on any thread), so it overlaps compute."""
        if self._copy_stream is None:
            return nullcontext()
        on_device = ExitStack()  # a producer thread starts on the default device and stream
        on_device.enter_context(torch.cuda.device(self.device))
        on_device.enter_context(torch.cuda.stream(self._copy_stream))
        return on_device

    def _copies_done(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on the copy stream; None on the CPU.

        Recorded by the thread that queued a batch's copies, so the consumer waits for that
        batch only, not for the next one a producer thread may already be copying.
        """
        if self._copy_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._copy_stream)
        return event

    def _hand_over(self, batch: Batch, copies_done: torch.cuda.Event | None) -> Batch:
        """On the consumer's thread: its stream waits for the batch's copies, whose memory then
        stays allocated until the work it queues after this point is done (record_stream)."""
        if copies_done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copies_done)
            for value in vars(batch).values():
                value.record_stream(current)
        return batch
