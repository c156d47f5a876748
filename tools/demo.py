"""The demo (`make demo`): synthetic COCO -> shards -> train configs/demo.yaml -> AP and pictures.

    python tools/demo.py --out runs/demo
    python tools/demo.py --out runs/demo --train-images 600 solver.max_iter=800   # config overrides last

Generates a synthetic COCO-format data set (train and val splits), shards it with the
sharder, trains the CPU demo config with evaluation after every epoch, prints box and mask AP,
and writes pictures of ground truth (left) next to predictions (right) on val images to
<out>/pictures. Everything lands under --out: data/, shards/, checkpoints/, mlperf.log,
metrics.jsonl, summary.json, detections.json.

The demo owns --out: run again, it starts afresh (it removes its previous run there and
says so). It refuses a folder holding a training run that it did not make.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from pipeline.sharding import shard_coco
from pipeline.synthetic_coco import make_synthetic_coco
from train import main as trainer
from train.run_folder import RunFolder, RunFolderError, run_files

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = "demo.json"  # written first (the folder is the demo's), then replaced by the demo's summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for data, shards and the run")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "demo.yaml", help="training config")
    parser.add_argument("--train-images", type=int, default=400, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=48, help="synthetic validation images")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"), help="landscape image size")
    parser.add_argument("--num-classes", type=int, default=4, help="synthetic object classes")
    parser.add_argument("--pictures", type=int, default=8, help="val images to draw with their predictions")
    parser.add_argument("--seed", type=int, default=0, help="data set seed")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for training")
    return parser


def make_data(args: argparse.Namespace) -> dict[str, Path]:
    """Synthetic train/val sets and their shards; returns the paths training needs."""
    data, shards = args.out / "data", args.out / "shards"
    paths = {}
    for split, count, mode in (("train", args.train_images, "train"), ("val", args.val_images, "eval")):
        annotations = make_synthetic_coco(
            data, split, count, seed=args.seed, image_size=tuple(args.image_size), num_classes=args.num_classes,
            max_objects=4, grayscale_fraction=0.0,
        )
        shard_coco(data / f"{split}2017", annotations, shards / split, mode=mode, samples_per_shard=100, workers=2, seed=args.seed)
        paths[split] = shards / split
        paths[f"{split}_annotations"] = annotations
        paths[f"{split}_images"] = data / f"{split}2017"
    return paths


def start_afresh(out: Path) -> None:
    """Remove the previous demo's run from `out` (and say so); a run the demo did not make stays, and stops it."""
    found = run_files(out)
    if not found:
        return
    if not (out / MARKER).is_file():
        raise RunFolderError(
            f"{out} holds a training run that the demo did not make ({', '.join(found[:3])}); pass another --out"
        )
    folder = RunFolder(out).lock()  # not while another demo or trainer uses the folder
    try:
        removed = folder.clear()
    finally:
        folder.release()
    shutil.rmtree(out / "pictures", ignore_errors=True)
    print(f"demo: starting afresh in {out}: removed the previous demo run ({', '.join(removed)})")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        start_afresh(args.out)
    except RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MARKER).write_text(json.dumps({"status": "running"}))  # this folder is the demo's
    paths = make_data(args)
    print(f"demo: synthetic data and shards ready in {time.perf_counter() - start:.0f} s under {args.out}")
    code = trainer.run([
        "--config", str(args.config),
        "--data", str(paths["train"]),
        "--val-data", str(paths["val"]),
        "--val-annotations", str(paths["val_annotations"]),
        f"output_dir={args.out}",
        *args.overrides,
    ])
    if code:
        return code
    from train.visualization import write_visualizations  # torch is imported by the training run by now

    summary = json.loads((args.out / "summary.json").read_text())
    pictures = write_visualizations(
        paths["val_annotations"], paths["val_images"], args.out / "pictures",
        predictions=args.out / "detections.json", num_images=args.pictures,
    )
    wall = time.perf_counter() - start
    print(
        f"demo: box AP {summary['box_ap']:.3f} (AP50 {summary['box_ap50']:.3f}), "
        f"mask AP {summary['mask_ap']:.3f} (AP50 {summary['mask_ap50']:.3f}) after {summary['epochs']} epochs; "
        f"{wall:.0f} s in all; {len(pictures)} pictures in {args.out / 'pictures'}"
    )
    (args.out / MARKER).write_text(json.dumps({**summary, "demo_wall_s": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
