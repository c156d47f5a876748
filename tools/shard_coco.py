"""Shard COCO (instances JSON + JPEG folder) into WebDataset tars with DALI indices, or verify shards.

Examples:
  # COCO 2017 with the reference training rules, and the full val set for evaluation
  python tools/shard_coco.py --images coco/train2017 --annotations coco/annotations/instances_train2017.json \\
      --out shards/train --mode train --workers 16
  python tools/shard_coco.py --images coco/val2017 --annotations coco/annotations/instances_val2017.json \\
      --out shards/val --mode eval --workers 16

  # check a finished shard folder before a long run: sha256, counts, index against tar, and
  # every sample against the format (checksums, labels, boxes, polygons)
  python tools/shard_coco.py --verify --out shards/train

A re-run replaces the shard set in --out only once the new one is complete. Errors a user can
fix end in one sentence and exit status 2; Ctrl-C, SIGTERM or SIGHUP end in one sentence too, the
half-written set removed and --out as it was (exit status 130, 143 or 129).

The rules each mode applies, and what the manifest records, are described in pipeline/sharding.py;
the shard layout in pipeline/shard_format.py.
"""

import argparse
import sys
import time
from pathlib import Path

from pipeline.shard_format import ShardFormatError
from pipeline.sharding import MODES, CocoInputError, ShardWriteError, shard_coco, verify_shards
from train.interrupts import Interrupted, signals_interrupt
from train.output_paths import OutputPathError, check_outputs_apart


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="folder holding the split's JPEGs (e.g. coco/train2017)")
    parser.add_argument("--annotations", type=Path, help="the split's COCO instances JSON")
    parser.add_argument("--out", type=Path, required=True, help="shard folder to write (or to check with --verify)")
    parser.add_argument("--mode", choices=MODES, help="train: reference filter rules; eval: keep every image")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar (default: 1000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, one shard each at a time (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards (default: 0)")
    parser.add_argument(
        "--split", help="split name in the shard names (default: from the annotation file, instances_<split>.json)"
    )
    parser.add_argument("--verify", action="store_true", help="check the shards in --out against its manifest and exit")
    return parser


def main(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 2 for anything a user can fix (one sentence on stderr), 128 + the signal's
    number when SIGINT (Ctrl-C), SIGTERM or SIGHUP stopped it (the half-written set is removed)."""
    try:
        with signals_interrupt():
            return _run(args)
    except (CocoInputError, ShardFormatError, ShardWriteError, OutputPathError) as e:
        print(f"shard_coco: {e}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        kept = "nothing was written" if args.verify else f"{args.out} is as it was before this run"
        print(f"shard_coco: {Interrupted(stop.signum, kept).sentence('run the same command again')}", file=sys.stderr)
        return stop.exit_code


def _run(args: argparse.Namespace) -> int:
    if args.verify:
        verify_shards(args.out)
        print(f"{args.out}: every shard matches manifest.json and every sample passes the format's checks")
        return 0
    if args.images is None or args.annotations is None or args.mode is None:
        raise CocoInputError("sharding needs --images, --annotations and --mode (or pass --verify)")
    check_outputs_apart({"--out": args.out}, {"--images": args.images, "--annotations": args.annotations})
    start = time.perf_counter()
    manifest = shard_coco(
        args.images, args.annotations, args.out, mode=args.mode, samples_per_shard=args.samples_per_shard,
        workers=args.workers, seed=args.seed, split=args.split, progress=True,
    )
    seconds = time.perf_counter() - start
    megabytes = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    for reason, count in {**manifest["dropped"], **manifest["repaired"]}.items():
        print(f"  {count:8d}  {reason}")
    print(
        f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shards to {args.out} "
        f"in {seconds:.1f} s: {manifest['samples'] / seconds:.1f} images/s, {megabytes / seconds:.1f} MB/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
