"""Evaluation beside training: inference at the epoch end, mask encoding and COCOeval in the background.

MLPerf's clock runs during evaluation, and the rules let it stop "as soon as any part of the
system determines target accuracy has been reached" (training_rules.adoc, Run Results). So
only inference sits on the training path: at an epoch end every rank runs its part of the val
shards through the training model, on its own device, in the training precision (as the
synchronous evaluation did). Then, while the next epoch trains:

1. each rank's encoding workers (train/evaluation.py) RLE-encode its masks;
2. at the first poll after every rank's encodings are done, rank 0 gathers them (one
   collective) and forks a scoring process: COCOeval, split by category over
   `eval.scoring_workers` processes of its own (train/parallel_cocoeval.py), sends the result,
   then writes detections.json (after the result, which may end the run at once);
3. at the first poll after the result came in, every rank receives it.

`EvaluationQueue.poll()` is called by every rank at the same points (the training loop's loss
read-back points and epoch ends). While an evaluation is in flight it costs one small
all_reduce, in which each rank says whether its encodings are done or lost and rank 0 how many
results it holds, so that every rank takes the same decision at the same step: gather now,
receive results, or stop on a lost evaluation. Results come out in epoch order, identical on
every rank; the caller stops at the first one that reaches the target.

Synchronous mode (`asynchronous=False`: tools, tests, a check) takes the same steps at once and
scores in this process; `start()` then returns the result.

Encoding stays on each rank (as NVIDIA's v3.0 submission does it): gathering raw 28x28 mask
probabilities to rank 0 instead would move ~1.5 GB per val2017 pass through one collective.
Scoring is a forked process per evaluation rather than a pool: the fork inherits the gathered
results and the ground truth, so nothing is pickled on the training path. It runs CPU code
only, never CUDA (which a forked child cannot use); it ignores Ctrl-C and SIGTERM, which are
the trainer's to handle; it dies with the trainer (PR_SET_PDEATHSIG, Linux); `close()` kills it
before its result, and lets it finish writing detections.json after it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import time
from collections import deque
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from train.distributed import DistributedContext, broadcast_from_main
from train.evaluation import (
    COCOEvaluator,
    EvaluationError,
    ImageResult,
    coco_results,
    collect_encodings,
    encoding_futures,
    gather_to_main,
    inference_on_dataset,
    merge_ranks,
)
from train.interrupts import follow_parent, leave_terminal_signals_to_parent

log = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]
WRITE_TIMEOUT_S = 120.0  # close(): how long a scoring process that sent its result may take to write detections.json
# The columns of the table the ranks agree on at each poll.
ENCODED, FAILED, SCORED = range(3)
LOST, ERROR = 1, 2  # FAILED: the evaluation ended without a result / with a user error (EvaluationError)


class EvaluationLost(RuntimeError):
    """An evaluation beside training ended without its result (a worker killed, out of memory); the message says what to do."""


@dataclass
class Evaluation:
    """One epoch's evaluation, from its inference to its result, and what it cost the training."""

    epoch: int  # 1-based, as the MLPerf log counts epochs
    iteration: int  # the weights evaluated
    inference_s: float = 0.0  # training waited: inference on the training devices
    waited_s: float = 0.0  # training waited besides: gathering the encodings, waiting for the result
    background_s: float = 0.0  # from the end of inference to the result, beside training (0 when synchronous)
    cocoeval_s: float = 0.0  # the scoring itself: COCOeval
    results: Metrics | None = None
    images: dict[int, ImageResult] | None = field(default=None, repr=False)  # this rank's, until gathered
    inference_end: float = 0.0  # time.time() when inference ended

    def timing(self) -> dict[str, float]:
        return {
            "wait_s": self.inference_s + self.waited_s,
            "inference_s": self.inference_s,
            "background_s": self.background_s,
            "cocoeval_s": self.cocoeval_s,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "iteration": self.iteration,
            "box_ap": self.results["bbox"]["AP"], "mask_ap": self.results["segm"]["AP"], **self.timing(),
        }


def save_detections(per_rank: Sequence[dict[int, ImageResult]], detections_path: Path | None) -> None:
    """detections.json (for pictures and tools/visualize.py), whole or not at all; a failed write is a warning."""
    if detections_path is None:
        return
    tmp = detections_path.with_name(f".{detections_path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(coco_results(merge_ranks(per_rank))))
        os.replace(tmp, detections_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("could not write %s (%s); the evaluation's result is not affected", detections_path, e.strerror or e)


class ScoringJob:
    """Rank 0: COCOeval of one gathered evaluation, then its detections.json, in a forked process (`background`) or at once.

    `outcome` is ("done", metrics, seconds, end time), ("error", sentence) for an EvaluationError,
    or ("lost", why) when the process ended without sending anything; None while it runs. The
    process sends the outcome before it writes detections.json.
    """

    def __init__(
        self, evaluator: COCOEvaluator, per_rank: list[dict[int, ImageResult]], detections_path: Path | None,
        *, background: bool,
    ):
        self.outcome: tuple | None = None
        self._process = None
        if not background:
            self.outcome = _scored(evaluator, per_rank)
            save_detections(per_rank, detections_path)
            return
        receiver, sender = get_context("fork").Pipe(duplex=False)
        self._connection: Connection = receiver
        self._process = get_context("fork").Process(
            target=_score_in_child, args=(sender, os.getpid(), evaluator, per_rank, detections_path),
            name="cocoeval",
        )
        self._process.start()
        sender.close()  # the child holds the only writing end: its exit reads as the end of the pipe

    def finished(self, timeout_s: float | None = 0.0) -> bool:
        """Whether the job has its outcome, waiting up to `timeout_s` for it (None: as long as it takes)."""
        if self.outcome is None and self._connection.poll(timeout_s):  # a message, or the child is gone
            try:
                self.outcome = self._connection.recv()
            except EOFError:
                self._process.join()
                self.outcome = ("lost", f"its scoring process (pid {self._process.pid}) {_ended(self._process.exitcode)}")
            self._connection.close()
        return self.outcome is not None

    @property
    def writing(self) -> bool:
        """Whether the process, its outcome sent, is still writing detections.json."""
        return self._process is not None and self.outcome is not None and self._process.is_alive()

    def close(self, timeout_s: float = WRITE_TIMEOUT_S) -> None:
        """End the process: killed before its outcome, given `timeout_s` to finish writing detections.json after it."""
        if self._process is None:
            return
        if self.outcome is not None:
            self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._connection.close()


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name} (out of memory? killed by hand?)"
    return f"ended with exit code {exitcode} without a result (its error is above)"


def _scored(evaluator: COCOEvaluator, per_rank: list[dict[int, ImageResult]]) -> tuple:
    began = time.perf_counter()
    try:
        metrics = evaluator.score(per_rank)
    except EvaluationError as e:
        return ("error", str(e))
    return ("done", metrics, time.perf_counter() - began, time.time())


def _score_in_child(
    sender: Connection, trainer_pid: int, evaluator: COCOEvaluator, per_rank: list, detections_path: Path | None
) -> None:
    """The scoring process: signals are the trainer's business, and it does not outlive the trainer."""
    gc.freeze()  # the trainer's objects are never collected here: some hold CUDA memory, which a fork must not touch
    leave_terminal_signals_to_parent()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # also the trainer's: it stops with a checkpoint and kills this process
    follow_parent(trainer_pid)
    sender.send(_scored(evaluator, per_rank))
    sender.close()
    save_detections(per_rank, detections_path)  # after the result, on which the run may stop at once


class EvaluationQueue:
    """The evaluations in flight, oldest first, the same on every rank; rank 0 also holds their scoring jobs."""

    def __init__(
        self, evaluator: COCOEvaluator, ctx: DistributedContext, *, asynchronous: bool, detections_path: Path | None,
    ):
        self.evaluator = evaluator
        self.ctx = ctx
        self.asynchronous = asynchronous
        self.detections_path = detections_path if ctx.is_main else None
        self._queue: deque[Evaluation] = deque()
        self._jobs: dict[int, ScoringJob] = {}  # rank 0: iteration -> its scoring job
        self._writing: list[ScoringJob] = []  # rank 0: jobs whose result came in, still writing detections.json

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def start(
        self, epoch: int, iteration: int, model: torch.nn.Module, loader: Any, autocast: Callable[[], Any]
    ) -> list[Evaluation]:
        """Inference of `model` (every rank) now, the rest beside training; returns the evaluations finished by now.

        Synchronous: waits for the result and returns it.
        """
        began = time.perf_counter()
        inference_on_dataset(model, loader, self.evaluator, autocast=autocast, score=False)
        evaluation = Evaluation(
            epoch, iteration, inference_s=time.perf_counter() - began, inference_end=time.time(),
            images=self.evaluator.take_results(),
        )
        self._queue.append(evaluation)
        return self.poll() if self.asynchronous else self.wait()

    def wait(self) -> list[Evaluation]:
        """Every rank: wait for the result of every evaluation in flight; returns them, oldest first."""
        finished = []
        while self._queue:
            finished += self.poll(timeout_s=None)
        return finished

    def poll(self, timeout_s: float | None = 0.0) -> list[Evaluation]:
        """Every rank, at the same points: the evaluations whose results came in, oldest first (identical on every rank).

        Waits up to `timeout_s` (None: as long as it takes) for the oldest evaluation's next step.
        Raises EvaluationLost (EvaluationError for a user error) on every rank when an evaluation
        ended without its result.
        """
        if not self._queue:
            return []
        began = time.perf_counter()
        head = self._queue[0]
        encoding = next((e for e in self._queue if e.images is not None), None)  # the next one to gather
        row, reason = [0, 0, 0], None
        if encoding is not None:
            row[ENCODED], reason = self._encodings_done(encoding, timeout_s)
            row[FAILED] = LOST if reason else 0
        if self.ctx.is_main and not row[FAILED]:
            row[SCORED], row[FAILED], reason = self._scored_results(timeout_s if encoding is None else 0.0)
        table = self._agree(row)
        failed = [rank for rank in range(self.ctx.world_size) if table[rank][FAILED]]
        if failed:
            self._raise_failure(failed[0], table[failed[0]][FAILED], reason)
        gathered_s = 0.0
        if encoding is not None and all(table[rank][ENCODED] for rank in range(self.ctx.world_size)):
            gathered_s = self._gather(encoding)
        finished = self._receive(table[0][SCORED])
        head.waited_s += time.perf_counter() - began - gathered_s
        return finished

    def close(self) -> None:
        """Kill the scoring processes still running (their evaluations stay due in run.json for a resume) and
        let those that sent their result finish writing detections.json."""
        for job in [*self._jobs.values(), *self._writing]:
            job.close()
        self._jobs.clear()
        self._writing.clear()
        self._queue.clear()

    def _encodings_done(self, evaluation: Evaluation, timeout_s: float | None) -> tuple[int, str | None]:
        """(1 if this rank's encodings of `evaluation` are all done, else 0; why they failed, if they did)."""
        futures = encoding_futures(evaluation.images)
        if futures and timeout_s != 0.0:
            wait_for_futures(futures, timeout=timeout_s)
        failure = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
        if failure is not None:
            first = " ".join(str(failure).split()).split(". ")[0]
            return 0, f"rank {self.ctx.rank}'s mask-encoding workers failed ({type(failure).__name__}: {first})"
        return int(all(f.done() for f in futures)), None

    def _scored_results(self, timeout_s: float | None) -> tuple[int, int, str | None]:
        """Rank 0: (how many of the oldest evaluations have their result, LOST/ERROR/0 for the next one, why)."""
        count = 0
        for evaluation in self._queue:
            job = self._jobs.get(evaluation.iteration)
            if job is None or not job.finished(timeout_s if count == 0 else 0.0):
                break
            if job.outcome[0] != "done":
                return count, LOST if job.outcome[0] == "lost" else ERROR, job.outcome[1]
            count += 1
        return count, 0, None

    def _agree(self, row: list[int]) -> list[list[int]]:
        """Every rank's row (ENCODED, FAILED, SCORED), on every rank: one all_reduce."""
        if not self.ctx.is_distributed:
            return [row]
        table = torch.zeros(self.ctx.world_size, len(row), dtype=torch.int64, device=self.ctx.device)
        table[self.ctx.rank] = torch.tensor(row, dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(table)
        return table.tolist()

    def _raise_failure(self, rank: int, kind: int, reason: str | None) -> None:
        """Raise, on every rank, the failure that `rank` found (its sentence is sent to the others)."""
        if self.ctx.is_distributed:
            holder = [reason]
            dist.broadcast_object_list(holder, src=rank)
            reason = holder[0]
        if kind == ERROR:
            raise EvaluationError(reason)
        epochs = [str(e.epoch) for e in self._queue]
        what, it = (f"epoch {epochs[0]}'s evaluation", "it") if len(epochs) == 1 else (
            f"the evaluations of epochs {', '.join(epochs)}", "them")
        raise EvaluationLost(
            f"{what} could not finish beside training: {reason}; run.json keeps {it} due, and --resume runs {it} first"
        )

    def _gather(self, evaluation: Evaluation) -> float:
        """Every rank's encoded results on rank 0, which starts scoring them; returns the seconds it took."""
        began = time.perf_counter()
        per_rank = gather_to_main(collect_encodings(evaluation.images))
        evaluation.images = None
        if per_rank is not None:
            self._writing = [job for job in self._writing if job.writing]
            self._jobs[evaluation.iteration] = ScoringJob(
                self.evaluator, per_rank, self.detections_path, background=self.asynchronous,
            )
        seconds = time.perf_counter() - began
        evaluation.waited_s += seconds
        return seconds

    def _receive(self, count: int) -> list[Evaluation]:
        """The `count` oldest evaluations' results, from rank 0 to every rank."""
        if count == 0:
            return []
        outcomes = None
        if self.ctx.is_main:
            outcomes = []
            for evaluation in list(self._queue)[:count]:
                job = self._jobs.pop(evaluation.iteration)
                self._writing.append(job)
                _, metrics, seconds, ended = job.outcome
                background = max(ended - evaluation.inference_end, 0.0) if self.asynchronous else 0.0
                outcomes.append((metrics, seconds, background))
        finished = []
        for metrics, seconds, background in broadcast_from_main(self.ctx, outcomes):
            evaluation = self._queue.popleft()
            evaluation.results, evaluation.cocoeval_s, evaluation.background_s = metrics, seconds, background
            finished.append(evaluation)
        return finished
