"""Rehearse the data path at COCO's size: make a train2017-sized synthetic set, shard it, verify it,
and open it as the ranks of 8- and 64-GPU runs would, measuring every step.

    python tools/rehearse_coco.py --out /tmp/rehearsal --json runs/rehearsal.json            # 118,287 images
    python tools/rehearse_coco.py --out /tmp/rehearsal --images 14786 --json runs/r8.json    # an eighth

Steps, each in a process of its own so that its figures are its own: wall time, CPU time (the
process and every process it started) and peak memory (the largest resident set among them):

1. `make`: pipeline/scale_coco.py's set (train2017's image and annotation counts, sizes and
   statistics; cheap JPEGs hard-linked from one per size, so the images take no disk);
2. `shard`: `tools/shard_coco.py --mode train --workers W`, the real tool;
3. `verify`: `tools/shard_coco.py --verify`;
4. `open`: in one process, for each world size (8 and 64 by default) and a few of its ranks,
   the trainer's own `build_data_loader` for each backend (the manifest and every index read,
   the backend's sample table), the epoch plan, and the first batch (the loader's start:
   DALI's pipeline build or the DataLoader's workers, then reading, decoding and resizing);
   wall, CPU and peak memory of each, per rank. The per-rank batch is the recipes': 96 images
   over 8 ranks (configs/batch96_8gpu.yaml), 256 over 64 (4 a rank).

The set and its shards are deleted at the end (`--keep` keeps them). Disk: about 4.2 GB at
full size (3.7 GB of shards and the 505 MB annotation file). Figures go to stdout and `--json`;
docs/SCALE.md has them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools import write_json

ROOT = Path(__file__).resolve().parents[1]
RECIPE_BATCH = {8: 96, 64: 256}  # global batch of the recipe a world size runs (configs/batch96_8gpu.yaml, 4 a rank at 64)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="working folder (the set and its shards; deleted at the end)")
    parser.add_argument("--images", type=int, default=118_287, help="images of the synthetic set (train2017: 118,287)")
    parser.add_argument("--workers", type=int, default=2, help="sharding worker processes (default: 2)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64], help="rank counts to open the shards as")
    parser.add_argument("--ranks", type=int, default=3, help="ranks opened per world size: the first, the last, between")
    parser.add_argument("--backends", nargs="+", choices=("dali", "torch"), default=["dali", "torch"])
    parser.add_argument("--keep", action="store_true", help="keep the set and the shards")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--step", choices=("make", "open"), help=argparse.SUPPRESS)  # a step's own process
    return parser


def measured(argv: list[str]) -> dict[str, Any]:
    """Run `argv` to its end: wall and CPU seconds and the peak resident set (MB) of it and its children."""
    began = time.perf_counter()
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"rehearse_coco: {' '.join(argv[1:3])} ended with exit status {process.returncode}")
    return {
        "wall_s": time.perf_counter() - began,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,  # Linux reports KiB; the largest process of the tree
        "output": output,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.step == "make":
        from pipeline.scale_coco import make_scale_coco

        print(json.dumps(make_scale_coco(args.out, "train", args.images)))
        return {}
    if args.step == "open":
        print(json.dumps(open_as_ranks(args.out, args.world_sizes, args.ranks, args.backends)))
        return {}
    if args.images < 2 or args.workers < 1 or args.ranks < 1 or min(args.world_sizes) < 1:
        raise SystemExit("rehearse_coco: --images takes a count of at least 2, --workers, --ranks and --world-sizes "
                         "counts of at least 1")
    data, shards = args.out / "coco", args.out / "shards"
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"rehearse_coco: {args.out} is not empty; pass a new or empty folder")
    me = [sys.executable, str(Path(__file__).resolve())]
    report: dict[str, Any] = {"images": args.images, "workers": args.workers, "cpus": os.cpu_count(),
                              "load_before": os.getloadavg()}
    try:
        steps = {
            "make": [*me, "--step", "make", "--out", str(data), "--images", str(args.images)],
            "shard": [sys.executable, "tools/shard_coco.py", "--images", str(data / "train2017"),
                      "--annotations", str(data / "instances_train.json"), "--out", str(shards), "--mode", "train",
                      "--workers", str(args.workers)],
            "verify": [sys.executable, "tools/shard_coco.py", "--verify", "--out", str(shards)],
            "open": [*me, "--step", "open", "--out", str(shards), "--ranks", str(args.ranks),
                     "--world-sizes", *map(str, args.world_sizes), "--backends", *args.backends],
        }
        for name, argv in steps.items():
            print(f"rehearse_coco: {name} ...", flush=True)
            figures = measured(argv)
            output = figures.pop("output")
            if name == "make":
                report["set"] = json.loads(output)
            elif name == "open":
                report["ranks"] = json.loads(output)
            else:
                figures["report"] = output.strip().splitlines()[-1]
            report[name] = figures
            print(f"  {name}: {figures['wall_s']:.1f} s, CPU {figures['cpu_s']:.1f} s, peak {figures['peak_mb']:.0f} MB",
                  flush=True)
            if name == "shard":
                report["shards"] = _shard_figures(shards)
        report["load_after"] = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(shards, ignore_errors=True)
    _print_ranks(report.get("ranks", []))
    write_json(args.json, report)
    return report


def _shard_figures(shards: Path) -> dict[str, Any]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return {
        "samples": manifest["samples"], "shards": len(manifest["shards"]),
        "bytes": sum(s["bytes"] for s in manifest["shards"]), "manifest_bytes": (shards / "manifest.json").stat().st_size,
        "index_bytes": sum(p.stat().st_size for p in shards.glob("*.idx")), "dropped": manifest["dropped"],
    }


def open_as_ranks(shards: Path, world_sizes: list[int], ranks: int, backends: list[str]) -> list[dict[str, Any]]:
    """For each world size, backend and a few ranks: the trainer's loader opened, its epoch plan, its first batch."""
    import torch

    from pipeline.epoch_plan import epoch_plan
    from train.config import load_config
    from train.distributed import DistributedContext
    from train.inputs import build_data_loader

    torch.set_num_threads(1)  # the rank's share of a host
    began = time.perf_counter()
    if "dali" in backends:
        import pipeline.dali_pipeline  # noqa: F401  (a process imports it once, before its loaders: not a rank's start-up)
    import pipeline.torch_loader  # noqa: F401
    rows: list[dict[str, Any]] = [{"imports_s": time.perf_counter() - began}]
    for world_size in world_sizes:
        chosen = sorted({0, world_size // 2, world_size - 1})[:ranks]
        for backend in backends:
            cfg = load_config(ROOT / "configs" / "reference.yaml", [
                f"data.train_shards={shards}", f"solver.ims_per_batch={RECIPE_BATCH.get(world_size, 2 * world_size)}",
                f"data.backend={backend}", "data.dali_threads=1", "data.torch_workers=1",
            ])
            for rank in chosen:
                context = DistributedContext(rank, world_size, 0, torch.device("cpu"))
                row: dict[str, Any] = {"world_size": world_size, "rank": rank, "backend": backend}
                with _step(row, "open"):
                    loader = build_data_loader(cfg, context, training=True)
                with _step(row, "plan"):
                    plan = epoch_plan(loader.shard_set, training=True, flip_prob=loader.settings.flip_prob,
                                      batch_size=loader.batch_size, rank=rank, world_size=world_size, seed=cfg.seed, epoch=0)
                with _step(row, "first_batch"):
                    batch = next(iter(loader))
                row.update(batches=len(plan), batch_size=len(batch), samples=sum(loader.shard_set.samples.values()))
                row["startup_s"] = row["open"]["wall_s"] + row["first_batch"]["wall_s"]
                rows.append(row)
                del loader, batch
    return rows


class _step:
    """Wall, CPU and peak memory (resident set, MB: its peak during the step, and what the step kept) of a block."""

    def __init__(self, row: dict[str, Any], name: str):
        self.row, self.name = row, name

    def __enter__(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM), Linux
        self.rss, self.wall, self.cpu = _memory()["VmRSS"], time.perf_counter(), time.process_time()

    def __exit__(self, *exc: object) -> None:
        memory = _memory()
        self.row[self.name] = {
            "wall_s": time.perf_counter() - self.wall, "cpu_s": time.process_time() - self.cpu,
            "peak_mb": memory["VmHWM"], "peak_growth_mb": memory["VmHWM"] - self.rss, "kept_mb": memory["VmRSS"] - self.rss,
        }


def _memory() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def _print_ranks(rows: list[dict[str, Any]]) -> None:
    if rows:
        print(f"  imports (once a process, not timed per rank): {rows[0]['imports_s']:.2f} s")
    for row in rows[1:]:
        parts = ", ".join(f"{n} {row[n]['wall_s']:.2f} s (CPU {row[n]['cpu_s']:.2f}, +{row[n]['peak_growth_mb']:.0f} MB peak, "
                          f"+{row[n]['kept_mb']:.0f} MB kept)" for n in ("open", "plan", "first_batch"))
        print(f"  {row['world_size']} ranks, rank {row['rank']}, {row['backend']}: start-up {row['startup_s']:.2f} s; {parts}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
