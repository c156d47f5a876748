"""Benchmark: our COCO evaluation path against the straightforward one, on a generated set.

Both paths score the same generated detections (boxes, scores, labels, 28x28 mask
probabilities in the network-input frame) in one run. Ours: `COCOEvaluator` (box-sized
paste, RLE in worker processes, faster-coco-eval by default). Reference: torchvision's
full-image `paste_masks_in_image`, pycocotools encode one mask at a time, pycocotools
COCOeval. Prints the time of each, the ratio and both APs; --json writes them too.

    python tools/bench_eval.py                                   # 5,000 images x 100 detections
    python tools/bench_eval.py --images 500 --dets-per-image 100 --json runs/bench_eval.json
    python tools/bench_eval.py --images 500 --backend pycocotools   # paste+encode gain alone
    python tools/bench_eval.py --ours-only                           # our path at full size
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from train.eval_benchmark import make_eval_set, run_benchmark


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="generated val images (val2017 has 5,000)")
    parser.add_argument("--dets-per-image", type=int, default=100, help="detections per image, each with a mask")
    parser.add_argument("--batch-size", type=int, default=16, help="images per process() call")
    parser.add_argument("--backend", choices=("pycocotools", "faster"), default="faster", help="COCOeval of our path")
    parser.add_argument("--workers", type=int, default=2, help="our RLE-encoding worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated set")
    parser.add_argument("--ours-only", action="store_true", help="time our path alone (the reference takes hours at full size)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        eval_set = make_eval_set(Path(tmp), args.images, args.dets_per_image, seed=args.seed)
        figures = run_benchmark(
            eval_set,
            batch_size=args.batch_size,
            backend=args.backend,
            num_workers=args.workers,
            with_reference=not args.ours_only,
        )
    print(
        f"\n{figures['images']} images x {figures['dets_per_image']} detections: "
        f"ours {figures['ours_s']:.1f} s ({args.backend}, {args.workers} workers)"
    )
    if args.ours_only:
        print(f"  AP: bbox {figures['ap_ours']['bbox']:.6f}, segm {figures['ap_ours']['segm']:.6f}")
    else:
        print(f"  reference {figures['reference_s']:.1f} s, speedup {figures['speedup']:.1f}x")
        for iou_type in ("bbox", "segm"):
            print(f"  {iou_type} AP: ours {figures['ap_ours'][iou_type]:.6f}, reference {figures['ap_reference'][iou_type]:.6f}")
        print(
            f"  largest difference over all 24 stats: {figures['max_stat_difference']:.2e}; "
            f"identical RLEs: {figures['identical_rles']} of {figures['masks']}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
