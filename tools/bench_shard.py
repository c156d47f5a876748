"""Sharding speed next to the decode-only rate of the same files, in one command on the same cores.

Decoding every JPEG once is the work sharding cannot avoid, so the ratio of the two rates
says how much the rest (reading, checking, tar writing, sha256) costs.

Examples:
  # the full-size synthetic setting: 300 images of about 640x480, 2 worker processes
  python tools/bench_shard.py --data /tmp/bench_coco --num-images 300 --workers 2 --samples-per-shard 50
  # real COCO val2017
  python tools/bench_shard.py --images coco/val2017 --annotations coco/annotations/instances_val2017.json --workers 16
"""

import argparse
import io
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.sharding import shard_coco
from pipeline.synthetic_coco import make_synthetic_coco
from tools import write_json
from train.output_paths import exit_if_overlapping


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="JPEG folder of an existing COCO split (else synthetic data)")
    parser.add_argument("--annotations", type=Path, help="instances JSON of that split")
    parser.add_argument(
        "--data", type=Path, default=Path("/tmp/bench_shard_coco"),
        help="where to make (or reuse) the synthetic set when --images is not given (default: /tmp/bench_shard_coco)",
    )
    parser.add_argument("--num-images", type=int, default=300, help="synthetic images, 480x640 (default: 300)")
    parser.add_argument("--workers", type=int, default=2, help="processes for both measurements (default: 2)")
    parser.add_argument("--samples-per-shard", type=int, default=50, help="images per tar (default: 50)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def _decode(path: Path) -> int:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        image.load()
    return 1


def decode_only_rate(paths: list[Path], workers: int) -> float:
    """Images/s of reading and fully decoding `paths` in `workers` processes (as the sharder does)."""
    with multiprocessing.Pool(workers) as pool:
        pool.map(_decode, paths[:workers])  # start the workers before the clock does
        start = time.perf_counter()
        decoded = sum(pool.imap_unordered(_decode, paths, chunksize=8))
        return decoded / (time.perf_counter() - start)


def main(args: argparse.Namespace) -> None:
    exit_if_overlapping("bench_shard", {"--json": args.json},
                        {"--images": args.images, "--annotations": args.annotations, "--data": args.data})
    if args.images is None:
        args.annotations = args.data / "instances_train.json"
        args.images = args.data / "train2017"
        if not args.annotations.is_file():
            make_synthetic_coco(args.data, "train", args.num_images, seed=0, image_size=(480, 640))
    files = [args.images / i["file_name"] for i in json.loads(args.annotations.read_text())["images"]]
    megabytes = sum(p.stat().st_size for p in files) / 1e6

    decode_rate = decode_only_rate(files, args.workers)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        manifest = shard_coco(args.images, args.annotations, out, mode="eval",
                              samples_per_shard=args.samples_per_shard, workers=args.workers)
        shard_rate = manifest["samples"] / (time.perf_counter() - start)
    figures = {
        "images": len(files), "mean_jpeg_kb": 1000 * megabytes / len(files), "workers": args.workers,
        "decode_only_images_per_s": decode_rate, "shard_images_per_s": shard_rate,
        "shard_over_decode": shard_rate / decode_rate,
    }
    print(f"{len(files)} images, mean JPEG {figures['mean_jpeg_kb']:.0f} KB, {args.workers} workers")
    print(f"decode only: {decode_rate:.1f} images/s")
    print(f"sharding:    {shard_rate:.1f} images/s ({figures['shard_over_decode']:.2f} of decode only; "
          "includes reading the JSON and starting the workers)")
    write_json(args.json, figures)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
