"""train/main.py runs for the tests: the tiny demo-config command line and what a run leaves.

- `command(train_shards, val_shards, synthetic_coco, output_dir, *extra)`: the argv of a tiny
  run (64x80 images, 6 iterations, a checkpoint every 2, losses read back every step,
  deterministic CPU settings, evaluation at the end);
- `losses(output_dir)`: iteration -> its logged metrics line;
- `reference_runs` (session fixture): backend -> the output_dir of one uninterrupted tiny run,
  made once per session and shared by every module (treat it as read-only: copy it to change
  it), and `reference_run`, the one on the DALI loader;
- `check_compliance(log, tmp_path)`: the MLPerf compliance checker's exit code and output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEMO = REPO / "configs" / "demo.yaml"
TINY = [
    "data.min_size=64",
    "data.max_size=80",
    "data.buckets=[[64, 80], [80, 64]]",
    "data.dali_threads=1", "data.torch_workers=1",
    "solver.ims_per_batch=2",
    "eval.ims_per_batch=2",
    "eval.num_workers=0",
    "solver.max_iter=6",
    "solver.steps=[4, 5]",
    "solver.warmup_iters=2",
    "train.checkpoint_every=2",
    "train.loss_readback_every=1",
    "train.deterministic=true",
    "train.num_threads=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def command(train_shards, val_shards, synthetic_coco, output_dir, *extra) -> list[str]:
    return [
        PYTHON, str(REPO / "train" / "main.py"), "--config", str(DEMO),
        "--data", str(train_shards), "--val-data", str(val_shards), "--val-annotations", str(synthetic_coco.val_json),
        *TINY, f"output_dir={output_dir}", *extra,
    ]


def losses(output_dir: Path) -> dict[int, dict]:
    """iteration -> its logged losses; a re-run iteration (after a resume) keeps its last line."""
    by_iteration = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_iteration[record["iteration"]] = record
    return by_iteration


@pytest.fixture(scope="session")
def reference_runs(train_shards, val_shards, synthetic_coco, tmp_path_factory):
    """backend -> an uninterrupted tiny run (6 iterations, checkpoints every 2, evaluation at the end)."""
    runs = {}

    def run_with(backend: str) -> Path:
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"reference_{backend}")
            subprocess.run(command(train_shards, val_shards, synthetic_coco, out, f"data.backend={backend}"),
                           check=True, env=ENV, capture_output=True)
            runs[backend] = out
        return runs[backend]

    return run_with


@pytest.fixture(scope="session")
def reference_run(reference_runs):
    """The reference run on the DALI loader."""
    return reference_runs("dali")


def check_compliance(log: Path, tmp_path: Path) -> tuple[int, str]:
    result = subprocess.run(
        [PYTHON, "-m", "mlperf_logging.compliance_checker", "--usage", "training", "--ruleset", "3.1.0",
         "--log_output", str(tmp_path / "checker.log"), str(log)],
        env=ENV, capture_output=True, text=True,
    )
    return result.returncode, result.stdout + result.stderr
