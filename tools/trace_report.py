"""The per-op table of a trace file, and a picture of its first seconds.

    python tools/trace_report.py runs/trace.json                       # the table (the form of Lotus' Table II)
    python tools/trace_report.py runs/trace.json --png runs/trace.png --seconds 2 --json runs/ops.json

The trace comes from `--trace FILE.json` on a dry run or `train.trace=FILE.json` on a training
run (train/trace.py says what each op measures). The table is computed from the file's events,
as the run computed the one it printed; the picture needs matplotlib (`pip install -e '.[trace]'`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools import write_json



def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path, help="a trace file written by --trace / train.trace")
    parser.add_argument("--png", type=Path, help="draw the trace's first seconds here")
    parser.add_argument("--seconds", type=float, help="how much of the trace to draw (default: as the run drew it, 2 s)")
    parser.add_argument("--json", type=Path, help="write the table's rows here")
    return parser


def main(args: argparse.Namespace) -> int:
    from train.output_paths import exit_if_overlapping
    from train.trace import TIMELINE_SECONDS, draw_timeline, format_op_table, op_table, span_durations  # torch: after --help

    exit_if_overlapping("trace_report", {"--png": args.png, "--json": args.json}, {"the trace": args.trace})
    seconds = args.seconds or TIMELINE_SECONDS
    try:
        document = json.loads(args.trace.read_text())
        durations = span_durations(document)
        images = int(document["otherData"]["images"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"trace_report: {args.trace} is not a trace written by --trace ({e}); run a dry run with --trace FILE.json",
              file=sys.stderr)
        return 2
    rows = op_table(durations, images)
    print(format_op_table(rows, images))
    write_json(args.json, rows)
    if args.png:
        try:
            draw_timeline(document, args.png, seconds)
        except ImportError:
            print("trace_report: --png needs matplotlib: pip install -e '.[trace]'", file=sys.stderr)
            return 2
        print(f"picture of the first {seconds:g} s: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
