"""Time to train from an MLPerf log: run_start to run_stop, as MLPerf scores it.

    python tools/time_to_train.py runs/batch96/mlperf.log
    python tools/time_to_train.py runs/batch96/mlperf.log --wall-s 1402 --started "2025-01-01 10:00:00"

Prints the time to train, how the run ended and the epoch whose result ended the run (the last
eval_accuracy before run_stop, which MLPerf's RCP check counts); with --wall-s (the command's
wall-clock seconds, as tools/run_and_time.sh measures them) also the reference's result line
`RESULT,OBJECT_DETECTION,,SECONDS,ORG,STARTED`. MLPerf's words are for runs with a quality
target: a run without one (eval.box_ap_target=1.0 or no evaluation: a fine-tune) that trained
its whole schedule is reported as that, with its training time and last result, and no RESULT
line. Exit code 0 when the run reached its quality target (status success) or, having none,
trained its schedule; 1 when it missed its target or was stopped early (status aborted); 2 when
the file is not a finished attempt's log.
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
    last = (
        f"epoch {result.epoch}: box AP {result.box_ap:.4f}, mask AP {result.mask_ap:.4f}" if result.epoch is not None
        else "no evaluation result"
    )
    span = f"{result.seconds:.1f} s ({result.seconds / 60:.2f} min) from run_start to run_stop in {args.log}"
    if result.ended == "schedule" and result.quality_target is None:  # a fine-tune: MLPerf's status does not apply
        print(f"training time: {span}; the run trained its whole schedule (it has no quality target); "
              f"last result {last}")
        return 0
    why = {"schedule": "; the schedule ended before the quality target", "stopped": "; the attempt stopped early"}
    print(f"time to train: {span}; status {result.status}{why.get(result.ended, '')}; {last}")
    if args.wall_s is not None:
        print(f"RESULT,OBJECT_DETECTION,,{args.wall_s},{result.org},{args.started}")
    return 0 if result.status == "success" else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
