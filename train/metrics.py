"""What a run reports while it trains: a progress bar, a JSON-lines file, TensorBoard.

Rank 0 only (other ranks build a `RunReporter` with `enabled=False`). The bar shows
loss, learning rate, images/s and tqdm's ETA; `<output_dir>/metrics.jsonl` gets one line
per logged step and per evaluation; TensorBoard scalars go to `<output_dir>/tensorboard`
when the tensorboard package is installed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from train.engine import LoggedStep

log = logging.getLogger(__name__)


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


class RunReporter:
    def __init__(self, output_dir: str | Path, *, enabled: bool, global_batch: int):
        self.enabled = enabled
        self.global_batch = global_batch
        self._bar: tqdm | None = None
        self._last_time = time.perf_counter()
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
        self._bar = tqdm(total=total_steps, desc=f"epoch {epoch + 1}", unit="it", dynamic_ncols=True)
        self._last_time = time.perf_counter()

    def steps(self, steps: list[LoggedStep]) -> None:
        """Losses read back from the device: one bar update and one line per step."""
        if not self.enabled or not steps:
            return
        now = time.perf_counter()
        images_per_s = len(steps) * self.global_batch / max(now - self._last_time, 1e-9)
        self._last_time = now
        last = steps[-1]
        for step in steps:
            self.write({"iteration": step.iteration, "loss": step.total, "lr": step.lr, "skipped": step.skipped, **step.losses})
        if self._tensorboard is not None:
            for name, value in {"loss": last.total, "lr": last.lr, "images_per_s": images_per_s, **last.losses}.items():
                self._tensorboard.add_scalar(f"train/{name}", value, last.iteration)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{last.total:.3f}", lr=f"{last.lr:.4g}", img_s=f"{images_per_s:.1f}")
            self._bar.update(len(steps))

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def evaluation(self, epoch: int, iteration: int, results: dict[str, Any], timing: dict[str, float] | None = None) -> None:
        """One epoch's result; `timing`: what it cost the training (train/async_evaluation.py `Evaluation.timing`)."""
        if not self.enabled:
            return
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
