"""Write a synthetic COCO-format data set (instances JSON + JPEGs), deterministic for a seed.

Examples:
  # the small CPU demo setting: 64 train and 16 val images of about 160x200
  python tools/make_synthetic_coco.py --out data/synthetic --split train --num-images 64 --image-size 160 200
  python tools/make_synthetic_coco.py --out data/synthetic --split val --num-images 16 --image-size 160 200

  # the full-size setting (640x480, JPEGs of about 100-140 KB, like COCO's)
  python tools/make_synthetic_coco.py --out data/synthetic_full --num-images 300

  # COCO-like real photographs for pipeline benchmarks (needs scikit-image: the dev extra)
  python tools/make_synthetic_coco.py --photos --out data/photos --num-images 400

The output is `OUT/instances_<split>.json` and `OUT/<split>2017/<12-digit image id>.jpg`.
What the data contains is described in pipeline/synthetic_coco.py (drawn scenes) and
pipeline/photo_coco.py (`--photos`, which takes --split, --num-images, --seed and
--jpeg-quality; the other options shape drawn scenes only).
"""

import argparse
from pathlib import Path

from pipeline.coco_categories import COCO_CATEGORIES
from pipeline.photo_coco import make_photo_coco
from pipeline.synthetic_coco import MASK_FORMATS, make_synthetic_coco

SCENE_ONLY = (
    "image_size", "num_classes", "max_objects", "grayscale_fraction", "empty_fraction", "crowd_fraction", "masks",
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the JSON and the image folder into")
    parser.add_argument("--split", default="train", help="split name: instances_<split>.json, <split>2017/ (default: train)")
    parser.add_argument("--num-images", type=int, default=16, help="number of images (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes (default: 0)")
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=(480, 640), metavar=("HEIGHT", "WIDTH"),
        help="size of a landscape image; the short side varies down to 80%% of it and portrait images "
        "swap the sides (default: 480 640)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=8,
        help=f"number of categories, 1..{len(COCO_CATEGORIES)}, real COCO ids spread over the 80 (default: 8)",
    )
    parser.add_argument("--max-objects", type=int, default=6, help="most non-crowd objects in one image (default: 6)")
    parser.add_argument("--grayscale-fraction", type=float, default=0.1, help="share of grayscale JPEGs (default: 0.1)")
    parser.add_argument(
        "--empty-fraction", type=float, default=0.1, help="share of images without any annotation (default: 0.1)"
    )
    parser.add_argument(
        "--crowd-fraction", type=float, default=0.15,
        help="share of images with a crowd region annotated as RLE, iscrowd=1 (default: 0.15)",
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=None, help="JPEG quality, 1..95 (default: 90; 94 with --photos)"
    )
    parser.add_argument(
        "--masks", choices=MASK_FORMATS, default="polygons",
        help="instance masks as polygons, or as RLEs the way labeling tools export them: rle (compressed "
        "string), rle-list (uncompressed counts) (default: polygons)",
    )
    parser.add_argument(
        "--photos", action="store_true",
        help="COCO-like real photographs (pipeline/photo_coco.py) instead of drawn scenes, for benchmarks",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    parser = get_args_parser()
    if args.photos:
        changed = [f"--{n.replace('_', '-')}" for n in SCENE_ONLY if getattr(args, n) != parser.get_default(n)]
        if changed:
            raise SystemExit(f"make_synthetic_coco: {', '.join(changed)} shape drawn scenes only; drop them with --photos")
    try:
        if args.photos:
            json_path = make_photo_coco(
                args.out, args.split, args.num_images, seed=args.seed, jpeg_quality=args.jpeg_quality or 94
            )
        else:
            json_path = make_synthetic_coco(
                args.out,
                args.split,
                args.num_images,
                seed=args.seed,
                image_size=tuple(args.image_size),
                num_classes=args.num_classes,
                max_objects=args.max_objects,
                grayscale_fraction=args.grayscale_fraction,
                empty_fraction=args.empty_fraction,
                crowd_fraction=args.crowd_fraction,
                jpeg_quality=args.jpeg_quality or 90,
                masks=args.masks,
            )
    except ValueError as e:
        raise SystemExit(f"make_synthetic_coco: {e}") from None
    except OSError as e:
        raise SystemExit(
            f"make_synthetic_coco: cannot write {e.filename} ({e.strerror}); pass an --out folder you can write to"
        ) from None
    print(f"wrote {args.num_images} images to {args.out / f'{args.split}2017'} and annotations to {json_path}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
