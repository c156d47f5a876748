"""train/main.py with COCOeval held back until training has gone on: for tests/test_train_async_eval.py.

    python tests/held_cocoeval.py RECORD UNTIL_ITERATION [train/main.py arguments]

The scoring process that evaluation beside training forks on rank 0 runs `COCOEvaluator.score`.
Here that first appends {"pid": ...} to RECORD (JSON lines), then waits until the run's
metrics.jsonl has logged iteration UNTIL_ITERATION, appends {"pid": ..., "saw_iteration": N}
and scores as usual. A training loop that waited for COCOeval would never log that iteration
(the wait ends after DEADLINE_S and the record says what it saw). A huge UNTIL_ITERATION holds
the evaluation until the test kills something.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from train import evaluation, main

DEADLINE_S = 300


def last_logged_iteration(metrics: Path) -> int:
    """The highest training iteration in metrics.jsonl so far (0: none yet)."""
    last = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line being written
                continue
            if "loss" in record:
                last = max(last, record["iteration"])
    return last


def held(record: Path, until: int, metrics: Path):
    real = evaluation.COCOEvaluator.score

    def write(entry: dict) -> None:
        with open(record, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **entry}) + "\n")

    def score(self, per_rank):
        write({})
        deadline = time.monotonic() + DEADLINE_S
        seen = last_logged_iteration(metrics)
        while seen < until and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = last_logged_iteration(metrics)
        write({"saw_iteration": seen})
        return real(self, per_rank)

    return score


if __name__ == "__main__":
    record, until, *argv = sys.argv[1:]
    output_dir = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("output_dir="))
    evaluation.COCOEvaluator.score = held(Path(record), int(until), Path(output_dir) / "metrics.jsonl")
    sys.exit(main.run(argv))
