"""The input pipeline alone (no model), next to the baselines that say where its time goes.

    python tools/bench_pipeline.py --data SHARDS --batch-size 8 --iters 30 \\
        --baseline-images photos/train2017 --baseline-annotations photos/instances_train.json \\
        --repeat 3 --json runs/bench_pipeline.json data.dali_threads=2 data.torch_workers=2
    python tools/bench_pipeline.py --data SHARDS --rows torch_loader torchvision ...   # without DALI
    python tools/bench_pipeline.py --data SHARDS --device cuda ...                     # on a GPU

Rows, each pulled as fast as it delivers after a warm-up, one after the other on the same cores:

- `dali_loader`: `build_loader(..., backend="dali")`, batches as the trainer gets them;
- `dali_graph`: the loader's own DALI pipeline (pipeline/dali_pipeline.py), fed by its epoch
  plan (the reads included), outputs left in DALI's buffers: the loader minus its batching;
- `bare_dali`: a plain webdataset reader -> decode -> flip -> resize (resize_shorter/max_size)
  over the same shards: the cost of DALI's operators alone;
- `torch_loader`: the torch fallback (`backend="torch"`);
- `torchvision`: torchvision's reference-style loader (`CocoDetection` + `transforms.v2`:
  decode, flip, resize, full-image masks from the polygons, DataLoader workers) on the COCO
  folder the shards were made from (--baseline-images/--baseline-annotations).

Each row reports images/s (wall clock) and CPU ms per image: the CPU time of this process and
its worker processes, which another job on a shared machine disturbs far less than images/s.
Ratios: `dali_loader/dali_graph` is the host overhead around the graph, `dali_graph/bare_dali`
the graph's excess over plain operators, `dali_loader/bare_dali` the goal (CPU <= 1/0.9, rate
>= 0.9), `torch_loader/torchvision` and `dali_loader/torchvision` the speed-ups over
torchvision's loader; each as CPU-time ratio (above 1: costs more) and rate ratio (above 1:
faster). `--repeat N` runs all rows N times interleaved and reports medians (every run is in the
JSON). With `--device cuda` the DALI rows decode with nvJPEG (`mixed`) and the torch fallback
decodes and resizes on the GPU; batches are waited for on the device before a clock is read.
`--stages` adds the bare pipeline cut after the reader and after the decoder, which splits the
DALI rows' CPU time into read, decode and flip+resize. Keep --warmup plus --iters within one
epoch (the report prints the batches per epoch): each epoch starts fresh pipelines.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from pipeline.loader import LoaderSettings, build_loader, dali_available, settings_from_config
from pipeline.shard_format import ShardFormatError, open_shard_set
from tools import write_json
from train.config import ConfigError, load_config
from train.output_paths import exit_if_overlapping
from train.throughput import endless, loader_rate, measure_rate

ROWS = ("dali_loader", "dali_graph", "bare_dali", "torch_loader", "torchvision")
STAGE_ROWS = ("bare_dali_read", "bare_dali_decode")
TRACED_ROWS = ("dali_loader_traced", "torch_loader_traced")  # the loaders with their timer tracing (--trace-cost)
RATIOS = (
    ("dali_loader", "dali_graph"),
    ("dali_graph", "bare_dali"),
    ("dali_loader", "bare_dali"),
    ("torch_loader", "torchvision"),
    ("dali_loader", "torchvision"),
    ("dali_loader_traced", "dali_loader"),
    ("torch_loader_traced", "torch_loader"),
)
SWEEP_KEYS = {"data.dali_threads": "dali", "data.torch_workers": "torch"}  # what --sweep varies, and whose loader


class Bench:
    """The rows of one benchmark run: same shards, batch size, settings and device."""

    def __init__(self, data_cfg: Any, shard_dir: Path, *, batch_size: int, warmup: int, iters: int, device: torch.device):
        self.data_cfg = data_cfg
        self.shard_dir = shard_dir
        self.batch_size = batch_size
        self.warmup = warmup
        self.iters = iters
        self.device = device
        self.settings: LoaderSettings = settings_from_config(data_cfg, training=True)

    def _loader(self, backend: str):
        return build_loader(
            self.data_cfg, self.shard_dir, training=True, batch_size=self.batch_size, device=self.device, backend=backend
        )

    def _rate(self, batches: Iterator[Any], images_in: Callable[[Any], int] | None = None) -> dict[str, float]:
        images_in = images_in or (lambda _: self.batch_size)
        return measure_rate(batches, images_in, warmup=self.warmup, iters=self.iters, device=self.device)

    def loader(self, backend: str, trace: bool = False) -> dict[str, Any]:
        """The loader's rate and its per-stage wall-clock breakdown, as the dry run measures it; with
        `trace`, its timer keeps every span of the measured batches (train/trace.py), and the row
        says how many spans that was per image."""
        loader = self._loader(backend)
        result = loader_rate(loader, warmup=self.warmup, iters=self.iters, device=self.device, trace=trace)
        if trace:
            spans = sum(len(thread.spans) // 3 for thread in loader.timer.threads())
            result["spans_per_image"] = spans / max(loader.timer.traced_images, 1)
        return result

    def dali_graph(self) -> dict[str, Any]:
        """The DALI loader's pipeline alone, fed by its plan; outputs stay in DALI's buffers."""
        loader = self._loader("dali")

        def epoch(e: int) -> Iterator[Any]:
            pipe, feeder, groups = loader.epoch_pipeline(e)
            for _ in groups:
                yield pipe.run()
                feeder.take()  # the records the loader would batch

        return self._rate(endless(epoch))

    def bare_dali(self, stage: str = "resize") -> dict[str, Any]:
        """webdataset reader -> decode -> flip -> resize over every shard, cut after `stage`."""
        from nvidia.dali import fn, pipeline_def, types

        groups = open_shard_set(self.shard_dir).groups.values()
        tars = [str(t) for g in groups for t in g.tars]
        indices = [str(i) for g in groups for i in g.indices]
        on_gpu = self.device.type == "cuda" and self.settings.decode_device != "cpu"
        settings = self.settings

        @pipeline_def
        def bare():
            jpegs = fn.readers.webdataset(
                paths=tars, index_paths=indices, ext=["jpg"], dtypes=[types.UINT8],
                random_shuffle=True, initial_fill=max(min(settings.shuffle_buffer, 1000), 1),
            )
            if stage == "read":
                return jpegs
            images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            if stage == "decode":
                return images
            images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
            return fn.resize(images, resize_shorter=settings.min_size, max_size=settings.max_size)

        pipe = bare(
            batch_size=self.batch_size,
            num_threads=settings.dali_threads,
            device_id=self.device.index if self.device.type == "cuda" else None,
            prefetch_queue_depth=settings.prefetch,
            seed=0,
        )
        pipe.build()
        return self._rate(iter(pipe.run, None))

    def torchvision(self, images: Path, annotations: Path) -> dict[str, Any]:
        loader = torchvision_reference_loader(images, annotations, self.settings, batch_size=self.batch_size)
        return self._rate(endless(lambda _: loader), lambda batch: len(batch[0]))

    def run(self, row: str, baseline: tuple[Path, Path] | None) -> dict[str, Any]:
        if row in ("dali_loader", "torch_loader", *TRACED_ROWS):
            return self.loader(row.split("_")[0], trace=row in TRACED_ROWS)
        if row == "dali_graph":
            return self.dali_graph()
        if row == "torchvision":
            return self.torchvision(*baseline)
        return self.bare_dali(row.rsplit("_", 1)[1] if row in STAGE_ROWS else "resize")


def _as_tuples(batch: list[tuple[Any, Any]]) -> tuple[tuple[Any, ...], ...]:
    return tuple(zip(*batch))  # torchvision references/detection utils.collate_fn


def torchvision_reference_loader(
    images: Path, annotations: Path, settings: LoaderSettings, *, batch_size: int
) -> torch.utils.data.DataLoader:
    """torchvision references/detection style: CocoDetection + transforms.v2, masks from polygons."""
    from torchvision import datasets
    from torchvision.transforms import v2

    transforms = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(0.5),
            v2.Resize(settings.min_size, max_size=settings.max_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    dataset = datasets.CocoDetection(str(images), str(annotations), transforms=transforms)
    dataset = datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=("boxes", "labels", "masks"))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=max(settings.torch_workers, 1),
        collate_fn=_as_tuples,
        persistent_workers=True,
    )


def span_cost_ns(spans: int = 20_000, repeat: int = 5) -> dict[str, float]:
    """What one span costs (ns, best of `repeat`): `measure` with the timer off and tracing, and a
    traced span's way back from a worker (`take` there, `merge` here)."""
    from pipeline.loader import StageTimer

    def per_span(timer: StageTimer) -> float:
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter_ns()
            for _ in range(spans):
                with timer.measure("read"):
                    pass
            best = min(best, (time.perf_counter_ns() - start) / spans)
        return best

    off, on = StageTimer(), StageTimer()
    on.tracing = True
    cost = {"off": per_span(off), "on": per_span(on)}
    taken = on.take("worker", "worker")
    start = time.perf_counter_ns()
    StageTimer().merge(taken)
    cost["merge"] = (time.perf_counter_ns() - start) / (len(taken.spans) // 3)
    return cost


def tracing_cost(rows: dict[str, dict[str, Any]], span_ns: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per traced loader row: its spans per image times what tracing adds to a span (`span_cost_ns`),
    as a share of the untraced loader's CPU time per image; beside the rows' own CPU ratio."""
    out = {}
    for traced in TRACED_ROWS:
        plain = traced.removesuffix("_traced")
        if traced in rows and plain in rows:
            added_ms = rows[traced]["spans_per_image"] * (span_ns["on"] - span_ns["off"] + span_ns["merge"]) / 1e6
            out[plain] = {
                "spans_per_image": rows[traced]["spans_per_image"],
                "added_cpu_ms_per_image": added_ms,
                "share_of_cpu": added_ms / rows[plain]["cpu_ms_per_image"],
                "measured_cpu_ratio": rows[traced]["cpu_ms_per_image"] / rows[plain]["cpu_ms_per_image"],
            }
    return out


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    median = dict(runs[len(runs) // 2])
    for key in ("images_per_s", "cpu_ms_per_image"):
        median[key] = statistics.median(r[key] for r in runs)
    if "stage_ms_per_image" in median:
        median["stage_ms_per_image"] = {
            s: None if v is None else statistics.median(r["stage_ms_per_image"][s] for r in runs)
            for s, v in median["stage_ms_per_image"].items()
        }
    return median


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`a/b`: CPU ms per image of a over b's, and images/s of a over b's, for the pairs both measured."""
    out = {}
    for a, b in RATIOS:
        if a in rows and b in rows:
            out[f"{a}/{b}"] = {
                "cpu": rows[a]["cpu_ms_per_image"] / rows[b]["cpu_ms_per_image"],
                "rate": rows[a]["images_per_s"] / rows[b]["images_per_s"],
            }
    return out


def run_pipeline_benchmark(
    data_cfg: Any,
    shard_dir: str | Path,
    *,
    batch_size: int,
    iters: int,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    rows: Iterable[str] | None = None,
    stages: bool = False,
    trace_cost: bool = False,
    repeat: int = 1,
    baseline_images: str | Path | None = None,
    baseline_annotations: str | Path | None = None,
) -> dict[str, Any]:
    """Every figure of `rows` (default: the loader of `backend`, and for DALI its graph and the bare pipeline).

    `images_per_s` and `stage_ms_per_image` at the top are the loader of `backend` (default:
    `data.backend`), what train/dry_run.py reports; `stages` adds STAGE_ROWS; `trace_cost` adds
    the traced twin of each loader row and what tracing costs (`tracing_cost`). Raises
    ValueError for a row that cannot run here.
    """
    device = torch.device(device)
    backend = backend or data_cfg.backend
    baseline = (Path(baseline_images), Path(baseline_annotations)) if baseline_images and baseline_annotations else None
    rows = list(rows or (["dali_loader", "dali_graph", "bare_dali"] if backend == "dali" else []))
    rows += list(STAGE_ROWS) if stages else []
    if f"{backend}_loader" not in rows:
        rows.insert(0, f"{backend}_loader")
    if trace_cost:
        rows += [f"{row}_traced" for row in rows if f"{row}_traced" in TRACED_ROWS and f"{row}_traced" not in rows]
    if any("dali" in r for r in rows) and not dali_available():
        raise ValueError("the dali rows need nvidia-dali (pip install -e '.[dali]'); pass --rows torch_loader torchvision")
    if "torchvision" in rows and baseline is None:
        raise ValueError("the torchvision row needs --baseline-images and --baseline-annotations")
    bench = Bench(data_cfg, Path(shard_dir), batch_size=batch_size, warmup=warmup, iters=iters, device=device)
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    for _ in range(repeat):
        for row in rows:
            runs[row].append(bench.run(row, baseline))
            gc.collect()  # end this row's pipelines and worker processes before the next row
    figures = {row: _median_row(r) for row, r in runs.items()}
    span_ns = span_cost_ns() if any(r in figures for r in TRACED_ROWS) else None
    ours = figures[f"{backend}_loader"]
    stages = dict(ours["stage_ms_per_image"])
    if backend == "dali" and all(r in figures for r in ("bare_dali", *STAGE_ROWS)):
        cpu = {r: figures[r]["cpu_ms_per_image"] for r in ("bare_dali_read", "bare_dali_decode", "bare_dali")}
        stages.update(  # CPU ms inside DALI's threads, from the bare pipeline's prefixes
            read=cpu["bare_dali_read"],
            decode=cpu["bare_dali_decode"] - cpu["bare_dali_read"],
            augment=cpu["bare_dali"] - cpu["bare_dali_decode"],
        )
    return {
        "backend": backend,
        "device": str(device),
        "batch_size": batch_size,
        "iters": iters,
        "warmup": warmup,
        "repeat": repeat,
        "batches_per_epoch": ours["batches_per_epoch"],
        "min_size": bench.settings.min_size,
        "max_size": bench.settings.max_size,
        "dali_threads": bench.settings.dali_threads,
        "torch_workers": bench.settings.torch_workers,
        "images_per_s": ours["images_per_s"],
        "cpu_ms_per_image": ours["cpu_ms_per_image"],
        "stage_ms_per_image": stages,
        "rows": figures,
        "runs": runs,
        "ratios": ratios(figures),
        "span_cost_ns": span_ns,
        "tracing_cost": tracing_cost(figures, span_ns) if span_ns else {},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }


def parse_sweep(sweep: str) -> tuple[str, list[int]]:
    """`KEY=V1,V2,...` -> (KEY, [V1, V2, ...]); ValueError in one sentence for anything else."""
    key, _, listed = sweep.partition("=")
    if key not in SWEEP_KEYS:
        raise ValueError(f"--sweep varies one of {', '.join(SWEEP_KEYS)}, got {sweep!r}")
    try:
        values = [int(v) for v in listed.split(",")]
    except ValueError:
        raise ValueError(f"--sweep {sweep!r}: give integer values, e.g. {key}=1,2,4") from None
    return key, values


def run_sweep(
    config: Path,
    overrides: list[str],
    key: str,
    values: list[int],
    shard_dir: str | Path,
    *,
    batch_size: int,
    iters: int,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    repeat: int = 1,
    model_rate: float | None = None,
) -> dict[str, Any]:
    """The loader that `key` sets (SWEEP_KEYS) at each of `values`, interleaved over `repeat` rounds
    (medians), with the cores it keeps busy and, for `model_rate` (images/s one GPU trains), how
    many cores per GPU keep up with it (`cores_sentence`). Raises ValueError (ConfigError for a
    value the config refuses) for a sweep that cannot run."""
    backend = SWEEP_KEYS[key]
    if backend == "dali" and not dali_available():
        raise ValueError("a data.dali_threads sweep needs nvidia-dali (pip install -e '.[dali]'); sweep data.torch_workers")
    configs = {v: load_config(config, [*overrides, f"{key}={v}"]) for v in values}  # every value checked before any run
    load_before = os.getloadavg()
    runs: dict[int, list[dict[str, Any]]] = {v: [] for v in values}
    for _ in range(repeat):
        for value in values:
            bench = Bench(configs[value].data, Path(shard_dir), batch_size=batch_size, warmup=warmup, iters=iters,
                          device=torch.device(device))
            runs[value].append(bench.loader(backend))
            gc.collect()
    rows = []
    for value in values:
        median = _median_row(runs[value])
        rows.append({
            "value": value,
            "images_per_s": median["images_per_s"],
            "cpu_ms_per_image": median["cpu_ms_per_image"],
            "cores_busy": median["images_per_s"] * median["cpu_ms_per_image"] / 1000.0,
        })
    result = {
        "key": key,
        "backend": backend,
        "batch_size": batch_size,
        "iters": iters,
        "repeat": repeat,
        "device": str(device),
        "rows": rows,
        "runs": {str(v): r for v, r in runs.items()},
        "model_rate": model_rate,
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    if model_rate:
        result["cores_per_gpu"] = cores_per_gpu(rows, model_rate)
        result["sentence"] = cores_sentence(result)
    return result


def cores_per_gpu(rows: list[dict[str, Any]], model_rate: float) -> float:
    """Cores that keep up with `model_rate` images/s: the rate times the CPU seconds per image of the
    fastest setting (its CPU time includes what contention for the cores costs)."""
    fastest = max(rows, key=lambda row: row["images_per_s"])
    return model_rate * fastest["cpu_ms_per_image"] / 1000.0


def cores_sentence(result: dict[str, Any]) -> str:
    """What a user asks of a sweep: how many cores per GPU keep up with the model's rate."""
    rows, rate, key = result["rows"], result["model_rate"], result["key"]
    fastest = max(rows, key=lambda row: row["images_per_s"])
    keeping_up = [row for row in rows if row["images_per_s"] >= rate]
    here = (
        f"here {key}={keeping_up[0]['value']} already keeps up ({keeping_up[0]['images_per_s']:.0f} images/s)"
        if keeping_up else
        f"here the fastest setting, {key}={fastest['value']}, delivered {fastest['images_per_s']:.0f} images/s "
        f"({fastest['images_per_s'] / rate:.0%} of it) on {result['machine']['cpus']} cores"
    )
    where = "decoding and resizing on the CPU" if result.get("device", "cpu") == "cpu" else f"delivering to {result['device']}"
    return (
        f"to keep up with {rate:g} images/s per GPU the {result['backend']} loader, {where}, needs about "
        f"{result['cores_per_gpu']:.1f} cores per GPU ({fastest['cpu_ms_per_image']:.1f} CPU ms per image at "
        f"{key}={fastest['value']}, its fastest setting here); {here}"
    )


def print_sweep(result: dict[str, Any]) -> None:
    print(f"sweep of {result['key']} ({result['backend']} loader), batch {result['batch_size']}, "
          f"medians of {result['repeat']} round(s) of {result['iters']} batches, device {result['device']}")
    print(f"  {result['key']:>18s} {'images/s':>9s} {'CPU ms/image':>13s} {'cores busy':>11s}")
    for row in result["rows"]:
        print(f"  {row['value']:18d} {row['images_per_s']:9.1f} {row['cpu_ms_per_image']:13.2f} {row['cores_busy']:11.2f}")
    if "sentence" in result:
        print(result["sentence"])
    machine = result["machine"]
    print(f"machine: {machine['cpus']} CPUs, load average {machine['loadavg_before'][0]:.1f} -> {machine['loadavg_after'][0]:.1f}")


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """images/s and CPU ms per image at each setting, and the model's rate as a line. Needs matplotlib."""
    from train.trace import headless_pyplot

    plt = headless_pyplot()

    values = [row["value"] for row in result["rows"]]
    fig, rate_axis = plt.subplots(figsize=(7, 4.2))
    rate_axis.plot(values, [row["images_per_s"] for row in result["rows"]], "o-", color="tab:blue", label="images/s")
    if result["model_rate"]:
        rate_axis.axhline(result["model_rate"], color="tab:red", linestyle="--",
                          label=f"model: {result['model_rate']:g} images/s")
    rate_axis.set_xlabel(result["key"])
    rate_axis.set_ylabel("images/s")
    rate_axis.set_xticks(values)
    rate_axis.set_ylim(bottom=0)
    cpu_axis = rate_axis.twinx()
    cpu_axis.plot(values, [row["cpu_ms_per_image"] for row in result["rows"]], "s:", color="tab:gray", label="CPU ms/image")
    cpu_axis.set_ylabel("CPU ms per image")
    cpu_axis.set_ylim(bottom=0)
    handles = rate_axis.get_legend_handles_labels()[0] + cpu_axis.get_legend_handles_labels()[0]
    rate_axis.legend(handles=handles, loc="lower right", fontsize=8)
    load = result["machine"]["loadavg_before"][0], result["machine"]["loadavg_after"][0]
    rate_axis.set_title(f"{result['backend']} loader, batch {result['batch_size']}, {result['machine']['cpus']} cores, "
                        f"load {load[0]:.1f} -> {load[1]:.1f}", fontsize=9)
    if "sentence" in result:
        fig.text(0.01, 0.01, textwrap.fill(result["sentence"], 120), fontsize=7, va="bottom")
        fig.subplots_adjust(bottom=0.3)
    fig.tight_layout(rect=(0, 0.12 if "sentence" in result else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="shard folder written by tools/shard_coco.py")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--iters", type=int, default=20, help="batches measured after the warm-up, per row")
    parser.add_argument("--warmup", type=int, default=3, help="batches pulled before measuring, per row")
    parser.add_argument("--repeat", type=int, default=1, help="run all rows this many times, interleaved; medians reported")
    parser.add_argument(
        "--rows", nargs="+", choices=ROWS + STAGE_ROWS + TRACED_ROWS, default=None,
        help="rows to run (default: every row this machine can run with the arguments given)",
    )
    parser.add_argument("--stages", action="store_true", help="add the bare pipeline's prefixes (read, decode)")
    parser.add_argument("--trace-cost", action="store_true",
                        help="add each loader row again with its timer tracing, and what tracing costs per image")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...",
                        help="instead of the rows: the loader at each value of data.dali_threads or data.torch_workers")
    parser.add_argument("--model-rate", type=float, metavar="IMG_PER_S",
                        help="with --sweep: the images/s one GPU trains; says how many cores per GPU keep up with it")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="with --sweep: draw it here (needs matplotlib: .[trace])")
    parser.add_argument("--backend", choices=["dali", "torch"], default=None, help="whose loader heads the report (default: data.backend; torch without DALI)")
    parser.add_argument("--device", default="cpu", help="where batches are delivered: cpu or cuda")
    parser.add_argument("--config", type=Path, default=Path("configs/reference.yaml"), help="config file")
    parser.add_argument("--baseline-images", type=Path, help="COCO image folder for the torchvision row")
    parser.add_argument("--baseline-annotations", type=Path, help="COCO instances JSON for the torchvision row")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.dali_threads=2 data.torch_workers=2")
    return parser


def print_report(result: dict[str, Any]) -> None:
    print(f"batch {result['batch_size']}, {result['dali_threads']} DALI threads, {result['torch_workers']} workers, sizes {result['min_size']}/{result['max_size']}, "
          f"device {result['device']}, medians of {result['repeat']} run(s) of {result['iters']} batches")
    for row, figures in result["rows"].items():
        print(f"  {row:18s} {figures['images_per_s']:8.1f} images/s {figures['cpu_ms_per_image']:8.2f} CPU ms/image")
    print(f"{result['backend']} loader stages (ms/image):")
    for stage, ms in result["stage_ms_per_image"].items():
        print(f"  {stage:8s} {'inside DALI' if ms is None else f'{ms:8.2f}'}")
    for name, ratio in result["ratios"].items():
        print(f"ratio {name:26s} CPU {ratio['cpu']:.2f}x  rate {ratio['rate']:.2f}x")
    if result["span_cost_ns"]:
        cost = result["span_cost_ns"]
        print(f"a span costs {cost['off']:.0f} ns with the timer not tracing, {cost['on']:.0f} ns tracing, "
              f"and {cost['merge']:.0f} ns more from a worker")
    for row, cost in result["tracing_cost"].items():
        print(f"tracing {row}: {cost['spans_per_image']:.1f} spans per image add about {1000 * cost['added_cpu_ms_per_image']:.1f} "
              f"CPU us per image, {cost['share_of_cpu']:.2%} of its CPU time (the traced row measured {cost['measured_cpu_ratio']:.3f}x)")
    if result["warmup"] + result["iters"] > result["batches_per_epoch"]:
        print(f"note: the measurement crossed an epoch start ({result['batches_per_epoch']} batches per epoch)")
    machine = result["machine"]
    print(f"machine: {machine['cpus']} CPUs, load average {machine['loadavg_before'][0]:.1f} -> {machine['loadavg_after'][0]:.1f}")


def main(args: argparse.Namespace) -> int:
    exit_if_overlapping("bench_pipeline", {"--json": args.json, "--plot": args.plot}, {
        "--data": args.data, "--config": args.config, "--baseline-images": args.baseline_images,
        "--baseline-annotations": args.baseline_annotations,
    })
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0 or args.repeat < 1:
        print("bench_pipeline: --batch-size, --iters and --repeat must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.sweep:
        return sweep_main(args)
    if args.model_rate or args.plot:
        print("bench_pipeline: --model-rate and --plot go with --sweep", file=sys.stderr)
        return 2
    if bool(args.baseline_images) != bool(args.baseline_annotations):
        print("bench_pipeline: pass both --baseline-images and --baseline-annotations, or neither", file=sys.stderr)
        return 2
    rows = args.rows or [r for r in ROWS if (dali_available() or "dali" not in r) and (args.baseline_images or r != "torchvision")]
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_pipeline_benchmark(
            cfg.data,
            args.data,
            batch_size=args.batch_size,
            iters=args.iters,
            warmup=args.warmup,
            device=args.device,
            backend=args.backend or (None if dali_available() else "torch"),  # no DALI: the torch rows head
            rows=rows,
            stages=args.stages,
            trace_cost=args.trace_cost,
            repeat=args.repeat,
            baseline_images=args.baseline_images,
            baseline_annotations=args.baseline_annotations,
        )
    except ConfigError as e:
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 2
    except (ShardFormatError, ValueError) as e:
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 1
    print_report(result)
    write_json(args.json, result)
    return 0


def sweep_main(args: argparse.Namespace) -> int:
    if args.model_rate is not None and args.model_rate <= 0:
        print("bench_pipeline: --model-rate must be a positive number of images/s", file=sys.stderr)
        return 2
    try:
        key, values = parse_sweep(args.sweep)
    except ValueError as e:
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 2
    try:
        result = run_sweep(args.config, args.overrides, key, values, args.data, batch_size=args.batch_size, iters=args.iters,
                           warmup=args.warmup, device=args.device, repeat=args.repeat, model_rate=args.model_rate)
    except ConfigError as e:
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # ShardFormatError included
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 1
    print_sweep(result)
    write_json(args.json, result)
    if args.plot:
        try:
            plot_sweep(result, args.plot)
        except ImportError:
            print("bench_pipeline: --plot needs matplotlib: pip install -e '.[trace]'", file=sys.stderr)
            return 2
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
