"""Draw ground truth and predictions (boxes, masks, class names) as PNGs a person can look at.

One PNG per image, named by image id: the ground truth, or with --predictions the ground
truth (left) and the predictions (right) side by side; --no-ground-truth draws predictions only.
Each panel is at least 640 pixels wide, with a header saying what it shows. A predictions file
that is not COCO results (a list of {image_id, category_id, bbox, score[, segmentation]}) is
refused in one sentence naming the entry, exit code 2.

    python tools/visualize.py --annotations coco/annotations/instances_val2017.json \\
        --images coco/val2017 --out runs/pictures/gt --num 16
    python tools/visualize.py --annotations coco/annotations/instances_val2017.json \\
        --images coco/val2017 --predictions runs/detections.json --out runs/pictures/pred
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.config_schema import COUNT, FRACTION, cli_type
from train.output_paths import OutputPathError, check_outputs_apart


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, type=Path, help="COCO instances JSON")
    parser.add_argument("--images", required=True, type=Path, help="folder of the annotated images")
    parser.add_argument("--predictions", type=Path, help="COCO results JSON (tools/evaluate.py --results)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    parser.add_argument("--num", type=cli_type(COUNT), default=8, help="images to draw (the first by id)")
    parser.add_argument("--score-threshold", type=cli_type(FRACTION), default=0.5, help="leave out weaker predictions")
    parser.add_argument("--no-ground-truth", action="store_true", help="draw the predictions only")
    return parser


def main(args: argparse.Namespace) -> int:
    from train.visualization import VisualizationError, write_visualizations  # after the command line is parsed

    if not args.annotations.is_file():
        print(f"error: {args.annotations} does not exist; pass a COCO instances JSON", file=sys.stderr)
        return 2
    try:
        check_outputs_apart(
            {"--out": args.out}, {"--annotations": args.annotations, "--images": args.images, "--predictions": args.predictions}
        )
        paths = write_visualizations(
            args.annotations,
            args.images,
            args.out,
            predictions=args.predictions,
            show_ground_truth=not args.no_ground_truth,
            num_images=args.num,
            score_threshold=args.score_threshold,
        )
    except (VisualizationError, OutputPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
