"""Run folders: one run per output_dir, its attempts, and what each attempt may touch.

The rules (rank 0 applies them; other ranks never write to the folder):

1. One trainer at a time. The trainer holds an exclusive POSIX lock (`fcntl.lockf`) on
   `<output_dir>/.lock` for its whole life, and a second trainer on the folder stops in one
   sentence. The OS drops the lock when the process ends, however it ends, so a kill -9 never
   leaves a stale lock. POSIX locks, unlike `flock`, are not inherited by forked children
   (the evaluation's encoding workers), so no surviving child can hold a dead trainer's lock.
2. One run per folder. A fresh run (no --resume) starts only in a folder holding none of a
   run's files (RUN_FILES, `mlperf*.log`); other files (the demo's data/, shards/) do not count.
   Otherwise it stops before writing anything and names --resume and a new folder.
3. `run.json` names the run (a random id, also stored in each of its checkpoints) and lists
   its attempts, the checkpoints it wrote (oldest first), the evaluations it finished and the
   ones due (each with the checkpoint holding the weights to evaluate). It is rewritten
   atomically (temporary file, then `os.replace`) on every change.
4. Each attempt (the first run, then every --resume) writes its own MLPerf log: `mlperf.log`
   for attempt 1, `mlperf-attempt-N.log` for attempt N. No attempt touches another's log, so a
   finished run's log stays as it was. `metrics.jsonl` belongs to the run: attempts append to
   it, each beginning with an `{"attempt": N, ...}` line.
5. Checkpoint rotation deletes only checkpoints listed in run.json (this run's own), never the
   newest `keep`, and never one whose evaluation is still due.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

FORMAT = "maskrcnn-train-run/1"
STATE_FILE = "run.json"
LOCK_FILE = ".lock"
# What a run writes into its folder (besides the MLPerf logs, mlperf*.log).
RUN_FILES = (STATE_FILE, "checkpoints", "metrics.jsonl", "summary.json", "config.yaml", "detections.json", "tensorboard")


class RunFolderError(ValueError):
    """output_dir cannot take this run (in use, holds another run, not writable); the message says what to do."""


def mlperf_log_name(attempt: int) -> str:
    return "mlperf.log" if attempt == 1 else f"mlperf-attempt-{attempt}.log"


def check_output_dir(output_dir: str | Path) -> None:
    """output_dir is, or can become, a writable folder: checked without writing anything."""
    path = Path(output_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise RunFolderError(f"output_dir={output_dir} cannot be a folder: {existing} is a file; pass another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"output_dir={output_dir} cannot be written (no write permission on {existing}); pass a folder you can write")


def run_files(output_dir: str | Path) -> list[str]:
    """The run files present in output_dir (empty for a new or unused folder)."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    names = [name for name in RUN_FILES if (path / name).exists()]
    return names + sorted(p.name for p in path.glob("mlperf*.log"))


class RunFolder:
    """output_dir held by this process: the lock, run.json, and the paths of this attempt's files."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir)
        self._lock: IO[str] | None = None
        self._created = False  # this process made the folder
        self.state: dict[str, Any] | None = None  # read once the lock is held

    # --- the lock -----------------------------------------------------------------------
    def lock(self) -> "RunFolder":
        """Take the folder (creating it), or raise RunFolderError if another trainer has it."""
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_FILE, "a+")
        except OSError as e:
            raise RunFolderError(
                f"output_dir={self.path} cannot be written ({e.strerror}); pass a folder you can write"
            ) from None
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderError(
                f"output_dir={self.path} is in use by another trainer ({holder}); "
                "wait for it to finish, or pass another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle
        self.state = self._read_state()  # what the previous holder left
        return self

    def release(self) -> None:
        """Let the folder go; one that this process made and never wrote to is removed (a refused start leaves nothing)."""
        if self._lock is None:
            return
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink()
            self.path.rmdir()
        self._lock.close()  # closing the file drops the POSIX lock
        self._lock = None

    def require_fresh(self) -> None:
        """A fresh run must not mix with another run's files (rule 2)."""
        found = run_files(self.path)
        if found:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise RunFolderError(
                f"output_dir={self.path} already holds a run ({shown}); continue it with --resume, "
                "or pass a new folder as output_dir=... for a fresh run"
            )

    def clear(self) -> list[str]:
        """Delete the run's files (the demo's fresh start); returns what was removed. Needs the lock."""
        assert self._lock is not None, "clear() needs the lock"
        removed = run_files(self.path)
        for name in removed:
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.state = None
        return removed

    # --- run.json -----------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        return self.state["run_id"] if self.state else None

    def begin_attempt(self, *, run_id: str | None, resumed_from: str | None, notes: list[str]) -> tuple[int, Path]:
        """Record a new attempt (a new run when the folder has none); returns its number and MLPerf log path."""
        if self.state is None:
            self.state = {
                "format": FORMAT, "run_id": run_id or uuid.uuid4().hex, "attempts": [],
                "checkpoints": [], "evaluations": [], "evaluations_due": [],
            }
        number = len(self.state["attempts"]) + 1
        while (self.path / mlperf_log_name(number)).exists():  # a folder from before run.json
            number += 1
        self.state["attempts"].append({
            "attempt": number, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
            "host": socket.gethostname(), "resumed_from": resumed_from, "notes": notes,
            "mlperf_log": mlperf_log_name(number), "ended": None,
        })
        self._write_state()
        return number, self.path / mlperf_log_name(number)

    def end_attempt(self, outcome: str) -> None:
        """How this attempt ended ("finished", "stopped by SIGTERM at iteration 8", ...); a killed one keeps None.

        Called as the attempt ends, however it ends: a disk too full to take the record is logged,
        not raised over the error that ends the attempt (the record then stays as a kill leaves it).
        """
        if self.state is not None and self.state["attempts"]:
            self.state["attempts"][-1]["ended"] = outcome
            try:
                self._write_state()
            except RunFolderError as e:
                log.warning("%s", e)

    def checkpoint_coming(self, name: str) -> None:
        """Record a checkpoint as this run's before it is written, so a kill in between cannot orphan it."""
        if name not in self.state["checkpoints"]:
            self.state["checkpoints"].append(name)
            self._write_state()

    def rotate(self, checkpoint_dir: Path, keep: int) -> None:
        """Delete this run's checkpoints but the newest `keep` and those a due evaluation needs (rule 5)."""
        needed = {due["checkpoint"] for due in self.state["evaluations_due"]}
        names = self.state["checkpoints"]
        doomed = [name for name in names[:-keep] if name not in needed] if keep > 0 else []
        for name in doomed:
            (checkpoint_dir / name).unlink(missing_ok=True)
        if doomed:
            self.state["checkpoints"] = [name for name in names if name not in doomed]
            self._write_state()

    def evaluation_due(self, epoch: int, iteration: int, checkpoint: str) -> None:
        """Epoch `epoch`'s evaluation must run on the weights in `checkpoint`, even after a kill."""
        self.state["evaluations_due"].append({"epoch": epoch, "iteration": iteration, "checkpoint": checkpoint})
        self._write_state()

    def evaluation_done(self, epoch: int, iteration: int, results: dict[str, dict[str, float]]) -> None:
        self.state["evaluations_due"] = [d for d in self.state["evaluations_due"] if d["iteration"] != iteration]
        self.state["evaluations"].append({"epoch": epoch, "iteration": iteration, **results})
        self._write_state()

    def drop_due_evaluation(self, iteration: int) -> None:
        """Forget a due evaluation that will not run (the caller logs why)."""
        self.state["evaluations_due"] = [d for d in self.state["evaluations_due"] if d["iteration"] != iteration]
        self._write_state()

    def due_evaluations(self) -> list[dict[str, Any]]:
        return list(self.state["evaluations_due"]) if self.state else []

    def evaluations(self) -> list[dict[str, Any]]:
        """The run's finished evaluations, in the order they finished."""
        return list(self.state["evaluations"]) if self.state else []

    def evaluation_at(self, iteration: int) -> dict[str, Any] | None:
        """The finished evaluation of the weights at `iteration`, if any."""
        done = [e for e in self.state["evaluations"] if e["iteration"] == iteration] if self.state else []
        return done[-1] if done else None

    def _read_state(self) -> dict[str, Any] | None:
        path = self.path / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise RunFolderError(f"{path} cannot be read ({e}); move it away to resume without its records") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise RunFolderError(f"{path} was not written by train/main.py; move it away to resume without it")
        return state

    def _write_state(self) -> None:
        path = self.path / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.state, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as e:  # a full disk: the previous run.json stays whole
            tmp.unlink(missing_ok=True)
            raise RunFolderError(
                f"cannot write {path} ({e.strerror or e}); free some space and continue with --resume"
            ) from None
