"""Time to train from an MLPerf log: run_start to run_stop, as MLPerf scores it.

    python tools/time_to_train.py runs/batch96/mlperf.log
    python tools/time_to_train.py runs/batch96/mlperf.log --wall-s 1402 --started "2025-01-01 10:00:00"

Prints the time to train, the status and the epoch whose result ended the run (the last
eval_accuracy before run_stop, which MLPerf's RCP check counts); with --wall-s (the command's
wall-clock seconds, as tools/run_and_time.sh measures them) also the reference's result line
`RESULT,OBJECT_DETECTION,,SECONDS,ORG,STARTED`. Exit code 0 when the run reached the quality
target (status success), 1 when it did not, 2 when the file is not a finished attempt's log.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.mlperf_log import read_run_result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="an attempt's MLPerf log (<output_dir>/mlperf.log)")
    parser.add_argument("--wall-s", type=int, help="the run command's wall-clock seconds: print the RESULT line too")
    parser.add_argument("--started", default="", help="when the run command started, for the RESULT line")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        result = read_run_result(args.log)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    converged = (
        f"epoch {result.epoch}: box AP {result.box_ap:.4f}, mask AP {result.mask_ap:.4f}" if result.epoch is not None
        else "no evaluation result"
    )
    print(f"time to train: {result.seconds:.1f} s ({result.seconds / 60:.2f} min) from run_start to run_stop in "
          f"{args.log}; status {result.status}; {converged}")
    if args.wall_s is not None:
        print(f"RESULT,OBJECT_DETECTION,,{args.wall_s},{result.org},{args.started}")
    return 0 if result.status == "success" else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
