"""Benchmark: the reference model's checkpoint with its optimizer, and what the recipes' checkpoints cost a run.

    python tools/bench_checkpoint.py --out /tmp/ckpt --repeat 5 --json runs/bench_checkpoint.json

The model of configs/reference.yaml for COCO's 80 categories and the trainer's optimizer
(momentum buffers filled by one step of zero gradients, so the state is as large as in
training) are saved with the trainer's own `save_checkpoint` (torch.save, fsync, rename) into
`--out`, and read back as a resume does (`read_checkpoint`, then the model's and the
optimizer's `load_state_dict`). Reported: the file's size, the median wall and CPU time of a
save and of a load over `--repeat` rounds (the first round, which pays for allocation, is kept
apart), the disk's write rate seen by `dd`-like plain writes of the same size beside it, and
for each recipe in configs/ how many checkpoints a run to the target writes (one every
`train.checkpoint_every` iterations and one at every epoch end) and their share of the run:

    saves x save time / (epochs x 117,266 images / the goal rate of the recipe's GPUs)

with the recipe's epochs to the target (its provenance: 12.7, 14, 17) and the goal rate of
180 images/s per GPU (NVIDIA's 8xH100 v3.0 run: 14 epochs in 19.2 min, about 1,440 images/s).
The saves are timed on this machine's disk: scale by the target host's write rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model.build import build_model
from pipeline.synthetic_coco import synthetic_categories
from tools import write_json
from train.checkpoint import read_checkpoint, save_checkpoint
from train.config import load_config
from train.engine import build_training_step

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 117_266
GOAL_IMAGES_PER_S_PER_GPU = 180.0  # NVIDIA v3.0 8xH100: 14 x 117,266 images in 19.2 min, over 8 GPUs
RECIPES = {  # recipe -> (GPUs, epochs to the target, from its provenance comment and the README)
    "batch8_1gpu.yaml": (1, 12.7),
    "batch96_8gpu.yaml": (8, 14.0),
    "batch256_32gpu.yaml": (32, 17.0),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder to write the checkpoints into (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=5, help="timed save/load rounds after the first (default: 5)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def reference_state(cfg: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[dict[str, Any]]]:
    """The reference model on the CPU and the trainer's optimizer with every momentum buffer allocated."""
    categories = [{"id": k + 1, "coco_id": c["id"], "name": c["name"]} for k, c in enumerate(synthetic_categories(80))]
    model = build_model(cfg.model, num_classes=len(categories) + 1)
    optimizer = build_training_step(cfg, torch.device("cpu"), model).optimizer
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, categories


def _timed(work) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def _plain_write_s(path: Path, size: int) -> float:
    """Seconds to write and fsync `size` bytes: what the disk alone allows for a checkpoint."""
    block = os.urandom(1 << 20)
    began = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - began
    path.unlink()
    return seconds


def recipe_costs(save_s: float) -> list[dict[str, Any]]:
    """Checkpoints each recipe writes on its way to the target, and their share of its training time at the goal rate."""
    rows = []
    for name, (gpus, epochs) in RECIPES.items():
        cfg = load_config(ROOT / "configs" / name)
        iterations_per_epoch = TRAIN_IMAGES / cfg.solver.ims_per_batch
        iterations = epochs * iterations_per_epoch
        every = cfg.train.checkpoint_every
        saves = int(epochs) + (int(iterations // every) if every else 0)  # epoch ends, and every `every` iterations
        training_s = epochs * TRAIN_IMAGES / (GOAL_IMAGES_PER_S_PER_GPU * gpus)
        rows.append({
            "recipe": name, "gpus": gpus, "epochs": epochs, "iterations": round(iterations), "checkpoint_every": every,
            "saves": saves, "training_s": training_s, "saves_s": saves * save_s, "share": saves * save_s / training_s,
        })
    return rows


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.repeat < 1:
        raise SystemExit("bench_checkpoint: --repeat takes a count of at least 1 (the timed rounds after the first)")
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "reference.yaml")
    model, optimizer, categories = reference_state(cfg)
    with tempfile.TemporaryDirectory(dir=args.out) if args.out else tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        saves, loads, path = [], [], None
        for round_ in range(args.repeat + 1):
            def save() -> None:
                nonlocal path
                path = save_checkpoint(out, model=model, optimizer=optimizer, scaler=None, iteration=round_, epoch=0,
                                       loader_state=None, config=cfg, categories=categories)

            def load() -> None:
                state = read_checkpoint(path)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])

            saves.append(_timed(save))
            loads.append(_timed(load))
            size = path.stat().st_size
            path.unlink()
        plain_s = _plain_write_s(out / "plain.bin", size)
    save_s = statistics.median(s for s, _ in saves[1:])
    figures = {
        "bytes": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "first_save_s": saves[0][0],
        "save_s": save_s, "save_cpu_s": statistics.median(c for _, c in saves[1:]),
        "load_s": statistics.median(s for s, _ in loads[1:]), "load_cpu_s": statistics.median(c for _, c in loads[1:]),
        "plain_write_s": plain_s,
        "recipes": recipe_costs(save_s),
        "load_average": os.getloadavg(),
    }
    print(f"checkpoint: {size / 1e6:.0f} MB ({figures['parameters'] / 1e6:.1f} M parameters, "
          f"{figures['trainable'] / 1e6:.1f} M with momentum)")
    print(f"  save {save_s:.2f} s (CPU {figures['save_cpu_s']:.2f} s; the first {saves[0][0]:.2f} s), "
          f"load {figures['load_s']:.2f} s (CPU {figures['load_cpu_s']:.2f} s); "
          f"writing as many bytes alone: {plain_s:.2f} s")
    for row in figures["recipes"]:
        print(f"  {row['recipe']}: {row['saves']} saves in {row['iterations']} iterations ({row['epochs']} epochs, "
              f"checkpoint_every {row['checkpoint_every']}): {row['saves_s']:.0f} s of {row['training_s'] / 60:.1f} min "
              f"at {GOAL_IMAGES_PER_S_PER_GPU * row['gpus']:.0f} images/s = {100 * row['share']:.2f}%")
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
