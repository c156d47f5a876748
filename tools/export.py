"""Export a trained model for deployment: ONNX files that onnxruntime runs without torch or this code.

    python tools/export.py --weights runs/my/checkpoints/ckpt-00006000.pt --out runs/my/export
    python tools/export.py --weights maskrcnn_resnet50_fpn_coco.pth --out export --shape 800 1344

Writes to --out one `model-<H>x<W>.onnx` per input shape (default: the config's static buckets,
data.buckets, one per orientation; --shape H W for one) and `export.json`: each file's input
shape, the resize rule (data.min_size, data.max_size), the categories of the class outputs (class
-> id and name), the inputs and outputs, and the check below. What the graph takes and returns,
and why ONNX: train/export.py. The model config comes from the checkpoint, as in
tools/predict.py (--config and KEY=VALUE overrides on top).

Each file is checked once written: onnxruntime and PyTorch run on the same image and their
detections must agree within train.export.TOLERANCE (box coordinates 0.01 px, scores 1e-5,
mask probabilities 1e-4, the same labels and counts); the largest differences are printed and
saved. Needs the export extra: pip install -e '.[export]' (onnx, onnxscript, onnxruntime).
Errors end in one sentence, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from train.config import ConfigError


class ExportError(ValueError):
    """An export that cannot be made or does not match PyTorch; the message says why."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help="trainer checkpoint, this model's or torchvision's Mask R-CNN state dict")
    parser.add_argument("--out", required=True, type=Path, help="folder for the .onnx files and export.json")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), help="one input shape (default: every data.buckets entry)")
    parser.add_argument("--config", type=Path, help="model config (default: the one saved in the checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.roi_heads.detections_per_img=50")
    return parser


def main(args: argparse.Namespace) -> int:
    from model.weights import WeightsError  # the heavy imports, after the command line is parsed

    try:
        export(args)
    except (ExportError, WeightsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def export(args: argparse.Namespace) -> dict:
    try:
        import onnxruntime  # noqa: F401  (checked before the minutes of an export)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"the export needs the export extra ({e.name} is missing): pip install -e '.[export]'") from None
    from train.export import OUTPUTS, TOLERANCE, export_onnx, largest_differences, onnx_session
    from train.inference import Detector

    detector = Detector(args.weights, config=args.config, overrides=args.overrides, device="cpu")
    data = detector.config.data
    shapes = [tuple(args.shape)] if args.shape else sorted({tuple(bucket) for bucket in data.buckets})
    if any(h % data.size_divisibility or w % data.size_divisibility for h, w in shapes):
        raise ExportError(f"--shape {shapes[0][0]} {shapes[0][1]} is not a multiple of data.size_divisibility={data.size_divisibility}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {args.out} cannot be made ({e.strerror}); pass a folder you can write to") from None
    files = []
    for height, width in shapes:
        path = args.out / f"model-{height}x{width}.onnx"
        start = time.perf_counter()
        print(f"export: writing {path} (input 1x3x{height}x{width}) ...", flush=True)
        export_onnx(detector.model, path, height, width)
        differences = largest_differences(detector.model, onnx_session(path), height, width)
        print(f"export: {path} written in {time.perf_counter() - start:.0f} s; onnxruntime against PyTorch: "
              + ", ".join(f"{name} {value:.2g}" for name, value in differences.items()))
        failed = [name for name, limit in TOLERANCE.items() if differences[name] > limit]
        if failed or differences["labels"] or differences["num_detections"]:
            raise ExportError(
                f"{path} does not reproduce PyTorch's detections (largest differences {differences}, allowed {TOLERANCE}); "
                "report it with the torch and onnxruntime versions"
            )
        files.append({"file": path.name, "input_shape": [1, 3, height, width], "largest_differences": differences})
    description = {
        "weights": str(args.weights),
        "files": files,
        "resize": {"min_size": data.min_size, "max_size": data.max_size, "pad_to": "the file's input shape, zeros"},
        "inputs": {"images": "uint8 [1, 3, H, W] RGB, resized then zero-padded",
                   "image_sizes": "int32 [1, 2]: the resized image's height and width"},
        "outputs": {name: _OUTPUT_DOCS[name] for name in OUTPUTS},
        "convention": detector.config.model.convention,  # reference: inclusive pixel boxes (train/export.py)
        "categories": detector.categories,
        "tolerance": TOLERANCE,
    }
    (args.out / "export.json").write_text(json.dumps(description, indent=1) + "\n")
    print(f"export: {len(files)} file(s) and export.json in {args.out}")
    return description


_OUTPUT_DOCS = {
    "boxes": "float32 [1, D, 4] xyxy in the resized image's pixels",
    "scores": "float32 [1, D], best first",
    "labels": "int64 [1, D]: the class (categories' id), 0 past num_detections",
    "mask_probs": "float32 [1, D, 28, 28]: each box's mask probabilities, to paste into its box",
    "num_detections": "int32 [1]",
}


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_intermixed_args()))
