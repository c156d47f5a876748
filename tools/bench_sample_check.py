"""CPU cost per image of the per-sample check every loader runs, next to an unchecked decode.

    python tools/bench_sample_check.py --data SHARDS [--repeat 20] [--json runs/sample_check.json]

Rows, each the best of three passes over every sample of the folder, in CPU microseconds per
image (this process only, one thread):
- `crc32`: zlib.crc32 of every component (what the checksum alone costs);
- `checked_decode`: `shard_format.decode_sample`, the whole check (checksums, json, labels,
  boxes, polygon rows) from bytes in memory;
- `unchecked_decode`: what format 1's decode did (json + np.frombuffer), the baseline;
- `read_sample`: `shard_format.read_sample`, the host read both loaders call (file reads included).
Compare them with the loader's CPU ms per image from tools/bench_pipeline.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.shard_format import (
    ARRAY_COMPONENTS,
    CHECKED_COMPONENTS,
    ShardFormatError,
    decode_sample,
    open_shard_set,
    read_index,
    read_sample,
    sample_refs,
)
from tools import write_json
from train.output_paths import exit_if_overlapping


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="shard folder written by tools/shard_coco.py")
    parser.add_argument("--repeat", type=int, default=20, help="passes over the samples per measurement (default: 20)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    return parser


def cpu_us_per_item(work: Callable[[Any], Any], items: Sequence, repeat: int) -> float:
    """Best of three measurements of `repeat` passes, CPU microseconds per item."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(repeat):
            for item in items:
                work(item)
        best = min(best, (time.process_time() - start) / (repeat * len(items)) * 1e6)
    return best


def _unchecked_decode(members: dict[str, bytes]) -> None:
    json.loads(members["json"])
    for name, (dtype, _) in ARRAY_COMPONENTS.items():
        np.frombuffer(members[name], dtype)


def main(args: argparse.Namespace) -> int:
    exit_if_overlapping("bench_sample_check", {"--json": args.json}, {"--data": args.data})
    try:
        shard_set = open_shard_set(args.data)
    except ShardFormatError as e:
        print(f"bench_sample_check: {e}", file=sys.stderr)
        return 2
    k = shard_set.num_categories
    in_memory = []
    for shards in shard_set.groups.values():
        for tar, index in zip(shards.tars, shards.indices):
            data = tar.read_bytes()
            for row in read_index(index):
                in_memory.append((row.key, {c: data[o : o + n] for c, (o, n) in row.members.items()}))
    refs = [ref for group in sample_refs(shard_set).values() for ref in group]
    figures = {
        "samples": len(in_memory),
        "mean_jpeg_kb": float(np.mean([len(m["jpg"]) for _, m in in_memory])) / 1e3,
        "crc32_us": cpu_us_per_item(lambda s: [zlib.crc32(s[1][c]) for c in CHECKED_COMPONENTS], in_memory, args.repeat),
        "checked_decode_us": cpu_us_per_item(lambda s: decode_sample(s[1], s[0], k), in_memory, args.repeat),
        "unchecked_decode_us": cpu_us_per_item(lambda s: _unchecked_decode(s[1]), in_memory, args.repeat),
        "read_sample_us": cpu_us_per_item(read_sample, refs, max(args.repeat // 4, 1)),
    }
    print(f"{figures['samples']} samples, mean JPEG {figures['mean_jpeg_kb']:.1f} KB; CPU us per image:")
    for name in ("crc32", "checked_decode", "unchecked_decode", "read_sample"):
        print(f"  {name:18s} {figures[name + '_us']:8.1f}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
