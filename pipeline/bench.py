"""Throughput of the input pipeline alone (no model), next to baselines run in the same process.

`run_pipeline_benchmark` pulls batches from `build_loader` as fast as they come after a warm-up
and reports images/s and the per-stage breakdown. With DALI it also times prefixes of a bare
DALI pipeline on the same shards (read; read+decode; read+decode+flip+resize), which is both the
"ceiling" baseline and the way to see the stages that run inside DALI's threads. Given COCO
images and annotations it runs torchvision's reference-style loader too (`CocoDetection` +
`transforms.v2`: decode, flip, resize, full-image masks from polygons, DataLoader workers).
Ratios are ours / baseline; every rate is wall-clock images/s on the same cores, one after the
other, so a busy machine shows up in `machine.loadavg_*`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from pipeline.loader import build_loader
from pipeline.settings import LoaderSettings, settings_from_config
from pipeline.shard_set import open_shard_set


def _endless(make_epoch: Callable[[int], Iterable[Any]]) -> Iterator[Any]:
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def measure_rate(batches: Iterator[Any], images_in: Callable[[Any], int], *, warmup: int, iters: int) -> dict[str, float]:
    """images/s over `iters` batches pulled after `warmup` batches.

    `cpu_ms_per_image` is this process's CPU time per image (DALI's threads included, DataLoader
    worker processes not): less sensitive than wall-clock rates to other work on a shared machine.
    """
    for _ in range(warmup):
        next(batches)
    images, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for _ in range(iters):
        images += images_in(next(batches))
    seconds = time.perf_counter() - start
    cpu_ms = 1000.0 * (time.process_time() - cpu_start) / images
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "cpu_ms_per_image": cpu_ms}


def _loader_rate(loader: Any, *, warmup: int, iters: int) -> dict[str, Any]:
    def epoch(e: int) -> Iterable[Any]:
        loader.set_epoch(e)
        return loader

    batches = _endless(epoch)
    for _ in range(warmup):
        next(batches)
    before = loader.timings()
    rate = measure_rate(batches, len, warmup=0, iters=iters)
    after = loader.timings()
    stages = {}
    for stage, total in after["total_s"].items():
        stages[stage] = None if total is None else 1000.0 * (total - before["total_s"][stage]) / rate["images"]
    return {**rate, "stage_ms_per_image": stages}


def bare_dali_pipeline(shard_dir: Path, settings: LoaderSettings, stage: str, *, batch_size: int, device: torch.device):
    """webdataset reader -> decode -> flip -> resize (shorter side, capped longer side), cut after `stage`."""
    from nvidia.dali import fn, pipeline_def, types

    shards = open_shard_set(shard_dir).groups.values()
    tars = [str(t) for group in shards for t in group.tars]
    indices = [str(i) for group in shards for i in group.indices]
    on_gpu = device.type == "cuda" and settings.decode_device != "cpu"

    @pipeline_def
    def bare():
        jpegs = fn.readers.webdataset(paths=tars, index_paths=indices, ext=["jpg"], dtypes=[types.UINT8])
        if stage == "read":
            return jpegs
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu")
        if stage == "decode":
            return images
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        return fn.resize(images, resize_shorter=settings.min_size, max_size=settings.max_size)

    pipe = bare(
        batch_size=batch_size,
        num_threads=settings.num_threads,
        device_id=device.index if device.type == "cuda" else None,
        prefetch_queue_depth=settings.prefetch,
        seed=0,
    )
    pipe.build()
    return pipe


def _bare_dali_rates(shard_dir: Path, settings: LoaderSettings, *, batch_size: int, device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    rates = {}
    for stage in ("read", "decode", "resize"):
        pipe = bare_dali_pipeline(shard_dir, settings, stage, batch_size=batch_size, device=device)
        rates[stage] = measure_rate(iter(pipe.run, None), lambda _: batch_size, warmup=warmup, iters=iters)
        del pipe
    return rates


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
        num_workers=settings.num_threads,
        collate_fn=_as_tuples,
        persistent_workers=True,
    )


def run_pipeline_benchmark(
    data_cfg: Any,
    shard_dir: str | Path,
    *,
    batch_size: int,
    iters: int,
    backend: str | None = None,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    baseline_images: str | Path | None = None,
    baseline_annotations: str | Path | None = None,
) -> dict[str, Any]:
    """Figures of the selected backend (`images_per_s`), its stages, and the baselines' rates and ratios."""
    device = torch.device(device)
    settings = settings_from_config(data_cfg, training=True)
    backend = backend or data_cfg.backend
    load_before = os.getloadavg()
    loader = build_loader(data_cfg, shard_dir, training=True, batch_size=batch_size, device=device, backend=backend)
    ours = _loader_rate(loader, warmup=warmup, iters=iters)
    batches_per_epoch = len(loader)
    del loader
    result: dict[str, Any] = {
        "backend": backend,
        "batch_size": batch_size,
        "iters": iters,
        "warmup": warmup,
        "batches_per_epoch": batches_per_epoch,  # warm-up + iters past it include an epoch start (pipelines rebuilt)
        "min_size": settings.min_size,
        "max_size": settings.max_size,
        "num_threads": settings.num_threads,
        "images_per_s": ours["images_per_s"],
        "cpu_ms_per_image": ours["cpu_ms_per_image"],
        "stage_ms_per_image": ours["stage_ms_per_image"],
        "baselines": {},
        "ratios": {},
    }
    if backend == "dali":
        bare = _bare_dali_rates(Path(shard_dir), settings, batch_size=batch_size, device=device, warmup=warmup, iters=iters)
        ms = {stage: 1000.0 / r["images_per_s"] for stage, r in bare.items()}
        # Stages inside DALI's threads, as differences of the prefix pipelines' per-image times
        # (augment: the bare flip+resize).
        result["stage_ms_per_image"].update(
            read=ms["read"], decode=ms["decode"] - ms["read"], augment=ms["resize"] - ms["decode"]
        )
        result["baselines"]["bare_dali"] = bare["resize"]
        result["baselines"]["bare_dali_stages_images_per_s"] = {s: r["images_per_s"] for s, r in bare.items()}
        result["ratios"]["vs_bare_dali"] = ours["images_per_s"] / bare["resize"]["images_per_s"]
        result["ratios"]["cpu_time_vs_bare_dali"] = bare["resize"]["cpu_ms_per_image"] / ours["cpu_ms_per_image"]
    if baseline_images and baseline_annotations:
        reference = torchvision_reference_loader(Path(baseline_images), Path(baseline_annotations), settings, batch_size=batch_size)
        rate = measure_rate(_endless(lambda _: reference), lambda b: len(b[0]), warmup=warmup, iters=iters)
        del reference
        result["baselines"]["torchvision"] = {"images_per_s": rate["images_per_s"]}  # its CPU is in worker processes
        result["ratios"]["vs_torchvision"] = ours["images_per_s"] / rate["images_per_s"]
    result["machine"] = {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    return result
