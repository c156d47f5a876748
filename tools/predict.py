"""Detect objects in a folder of photos: one COCO results JSON and one picture per image.

    python tools/predict.py --weights runs/demo/checkpoints/ckpt-00000138.pt --images photos/ --out runs/predict
    python tools/predict.py --weights maskrcnn_resnet50_fpn_coco.pth --images photos/ --out out --score-threshold 0.7

Every JPEG and PNG directly in --images is read (any size; photos with an EXIF orientation
are turned upright first, as viewers show them), batched by orientation, and run through the
model on the GPU when there is one (--device). Each image is resized and padded by the same code
as in evaluation, and its detections mapped back to the image's own pixels by the evaluator's
code. Written to --out:

- `detections.json`: COCO results entries, one per detection scoring at least
  --score-threshold: `image_id`, `file_name`, `category_id` and `category_name`, `bbox`
  [x, y, w, h] in the image's pixels, `score`, `segmentation` (RLE); pycocotools' `loadRes`
  reads it. The `image_id` depends on the file's own name only, so adding files to the folder
  never renumbers the others: a name that is a number gives that number (000000397133.jpg ->
  397133, as COCO's files), any other name a number below 2**52 made from its SHA-256
  (`train.inference.image_id`); two files with one id (7.jpg and 007.png) are an error naming both;
- `pictures/<name>.png`: the image with the detections drawn.

The model config comes from the checkpoint (a trainer checkpoint carries its config and its
categories); --config and KEY=VALUE overrides apply on top. Files without a config take
configs/reference.yaml and what the weights need (torchvision's COCO Mask R-CNN: RGB
normalization, stride in the 3x3 conv, its anchors, COCO's category names). Errors end in one sentence, exit
code 2; an image that does not decode is skipped with a one-sentence warning. Ctrl-C or SIGTERM
stops after writing detections.json for the images finished so far (exit code 130 or 143). An
--out that holds an earlier run's detections.json or pictures is refused before any work, unless
--overwrite is given (then they are removed once every check has passed); --out may not be
--images or lie inside it (train/output_paths.py).

The same in Python, on paths, PIL images or arrays: `train.inference.Detector` (this tool runs on it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

from train.config import ConfigError
from train.config_schema import COUNT, FRACTION, cli_type
from train.output_paths import OutputPathError, check_outputs_apart

if TYPE_CHECKING:
    import torch

    from train.interrupts import SignalStop

CHUNK_BATCHES = 4  # batches of images decoded at a time


class PredictError(ValueError):
    """Inputs the user can fix (folders, weights without detection heads); the message says how."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help="trainer checkpoint, this model's or torchvision's Mask R-CNN state dict")
    parser.add_argument("--images", required=True, type=Path, help="folder of JPEG/PNG images")
    parser.add_argument("--out", required=True, type=Path, help="folder for detections.json and pictures/")
    parser.add_argument("--score-threshold", type=cli_type(FRACTION), default=0.5, help="keep detections scoring at least this (0: all)")
    parser.add_argument("--config", type=Path, help="model config (default: the one saved in the checkpoint)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    parser.add_argument("--batch-size", type=cli_type(COUNT), help="images per forward pass (default: eval.ims_per_batch)")
    parser.add_argument("--no-pictures", action="store_true", help="write detections.json only")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the detections.json and pictures/ of an earlier run in --out (without it, such an --out is refused)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.roi_heads.detections_per_img=50")
    return parser


def main(args: argparse.Namespace) -> int:
    from model.weights import WeightsError  # the heavy imports, after the command line is parsed
    from train.inference import ImageError
    from train.interrupts import Interrupted, signals_interrupt

    try:
        with signals_interrupt() as stop:
            predict(args, stop)
    except (PredictError, WeightsError, ConfigError, ImageError, OutputPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(stop.sentence("run the same command again with --overwrite for every image"), file=sys.stderr)
        return stop.exit_code
    return 0


def predict(args: argparse.Namespace, stop: SignalStop | None = None) -> list[dict]:
    from pipeline.images import orientation_batches
    from train.inference import Detector, image_ids, result_entries
    from train.interrupts import Interrupted
    from train.visualization import category_colors, draw_predictions

    check_outputs_apart(
        {"--out": args.out, "--out (its pictures/)": args.out / "pictures"},
        {"--weights": args.weights, "--images": args.images, "--config": args.config},
    )
    earlier = _earlier_results(args)
    # A bad config value or weights file stops here, before --out is made.
    detector = Detector(args.weights, config=args.config, overrides=args.overrides, device=args.device,
                        score_threshold=args.score_threshold, batch_size=args.batch_size)
    files = _inputs(args)
    batch_size, device = detector.batch_size, detector.device
    names = {int(c["coco_id"]): c["name"] for c in detector.categories}
    colors = category_colors(sorted(names))

    for path in earlier:  # --overwrite, once every check has passed: no earlier result mixes with this run's
        path.unlink()
    if earlier:
        print(f"predict: --overwrite: removed the earlier run's {len(earlier)} files from {args.out}")
    ids = dict(zip(files, image_ids(files)))
    entries: list[dict] = []
    start, done, skipped = time.perf_counter(), 0, 0
    try:
        # Decoded a few batches at a time (memory stays bounded), batched by orientation within them.
        for first in range(0, len(files), CHUNK_BATCHES * batch_size):
            images = _decode(files[first : first + CHUNK_BATCHES * batch_size])
            skipped += min(CHUNK_BATCHES * batch_size, len(files) - first) - len(images)
            paths = list(images)
            for indices in orientation_batches([tuple(images[p].shape[1:]) for p in paths], batch_size):
                if stop:
                    stop.check()
                group = [paths[i] for i in indices]
                found_in_group = []
                for path, detections in zip(group, detector([images[p] for p in group])):
                    found = result_entries(detections, ids[path], path.name)
                    found_in_group.extend(found)
                    if not args.no_pictures:
                        picture = draw_predictions(images[path], found, names, colors, args.score_threshold)
                        _write_picture(picture, args.out / "pictures" / f"{path.stem}.png")
                entries.extend(found_in_group)  # a whole batch or none of it: `done` counts what the JSON holds
                done += len(group)
                rate = done / max(time.perf_counter() - start, 1e-9)
                print(f"predict: {done}/{len(files) - skipped} images, {rate:.1f} images/s on {device}")
    except Interrupted as stop:
        kept = []
        if done:
            (args.out / "detections.json").write_text(json.dumps(entries))
            kept.append(f"the {len(entries)} detections of the {done} images finished are in {args.out / 'detections.json'}")
        if not args.no_pictures and any((args.out / "pictures").iterdir()):
            kept.append(f"the pictures drawn are in {args.out / 'pictures'}")
        raise Interrupted(stop.signum, " and ".join(kept)) from None
    (args.out / "detections.json").write_text(json.dumps(entries))
    pictures = "" if args.no_pictures else f" and {done} pictures to {args.out / 'pictures'}"
    print(f"wrote {len(entries)} detections of {done} images to {args.out / 'detections.json'}{pictures}")
    return entries


def _write_picture(picture: torch.Tensor, path: Path) -> None:
    """Written beside, then renamed: a stop (Ctrl-C) during the write leaves no half picture."""
    from torchvision.io import write_png

    partial = path.with_name(f".{path.name}.partial")
    write_png(picture, str(partial))
    partial.replace(path)


def _decode(paths: list[Path]) -> dict[Path, torch.Tensor]:
    """Path -> uint8 RGB image, upright; a file that does not decode is skipped with a one-sentence warning."""
    from train.inference import ImageError, read_image

    images = {}
    for path in paths:
        try:
            images[path] = read_image(path)
        except ImageError as e:
            print(f"warning: skipped {e}; check or remove the file")
    return images


def _earlier_results(args: argparse.Namespace) -> list[Path]:
    """What an earlier run left in --out: detections.json, pictures/*.png; refused before any work without --overwrite."""
    detections = [args.out / "detections.json"] if (args.out / "detections.json").is_file() else []
    pictures = sorted((args.out / "pictures").glob("*.png"))
    if (detections or pictures) and not args.overwrite:
        drawn = f"{len(pictures)} picture{'s' * (len(pictures) != 1)}"
        what = ["detections.json"] * bool(detections) + [drawn] * bool(pictures)
        raise PredictError(
            f"--out {args.out} already holds {' and '.join(what)} from an earlier run; pass --overwrite to replace "
            "them, or a new --out"
        )
    return detections + pictures


def _inputs(args: argparse.Namespace) -> list[Path]:
    """The image files, after checking that --images has some, with distinct ids, and that --out can be written."""
    from train.inference import image_files, image_ids

    if not args.images.is_dir():
        raise PredictError(f"--images {args.images} is not a folder; pass the folder holding the JPEG/PNG files")
    files = image_files(args.images)
    if not files:
        raise PredictError(f"--images {args.images} holds no .jpg, .jpeg or .png file")
    image_ids(files)  # two files with one id stop here, before --out is made
    try:
        (args.out / "pictures").mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PredictError(f"--out {args.out} cannot be written ({e.strerror}); pass a folder you can write to") from None
    return files


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
