"""The torch fallback: the same `Batch` contract without DALI, and the in-repo baseline for benchmarks.

Stages follow the DALI pipeline: read a sample -> decode (torchvision.io.decode_jpeg, on the GPU
when the training device is CUDA) -> flip image, boxes and polygons with one coin -> resize
(pipeline/transforms.py) -> pad, in uint8; DataLoader workers do the per-sample work.

Samples are read by random access with the shards' DALI indices (`.idx` offsets) rather than
streamed with the `webdataset` library: an exact per-epoch permutation, the same per-rank
sample ranges as DALI's readers, and a mid-epoch resume that skips batches without reading
them all need random access, which a tar stream cannot give.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.batch import Batch
from pipeline.buffers import BufferPool
from pipeline.loader_base import LoaderBase
from pipeline.sampling import group_batches, group_order, reader_shard, shard_range
from pipeline.settings import LoaderSettings
from pipeline.shard_format import GROUPS, ShardFormatError, decode_sample, read_index
from pipeline.shard_set import GroupShards, ShardReadError, ShardSet, shard_error
from pipeline.transforms import (
    check_fits_bucket,
    flip_boxes,
    flip_vertices,
    pad_images,
    padded_shape,
    resized_size,
    scale_boxes,
    scale_vertices,
    transform_image,
)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's components sit: its tar and component -> (offset, size) from the index."""

    tar: Path
    members: dict[str, tuple[int, int]]
    key: str


def sample_refs(shard_set: ShardSet) -> dict[str, list[SampleRef]]:
    """Every sample of each group, in the order DALI's reader numbers them (shard order, then index order)."""
    return {
        group: [SampleRef(tar, row.members, row.key) for tar, index in zip(shards.tars, shards.indices) for row in read_index(index)]
        for group, shards in shard_set.groups.items()
    }


def epoch_plan(
    shard_set: ShardSet,
    *,
    training: bool,
    flip_prob: float,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
) -> list[list[tuple[str, int, bool]]]:
    """This rank's batches for an epoch: lists of (group, sample position, flip)."""
    per_group: dict[str, list[list[tuple[str, int, bool]]]] = {}
    batches = group_batches(shard_set.samples, world_size, batch_size)
    for group_index, group in enumerate(GROUPS):
        if not batches[group]:
            continue
        rng = np.random.default_rng([seed, epoch, rank, group_index])
        positions = np.array(
            shard_range(shard_set.groups[group].samples, reader_shard(rank, world_size, epoch, training), world_size)
        )
        if training:
            positions = rng.permutation(positions)
        total = batches[group] * batch_size
        positions = np.concatenate([positions, np.full(total - len(positions), positions[-1])])
        coins = rng.random(total) < flip_prob
        entries = [(group, int(p), bool(c)) for p, c in zip(positions, coins)]
        per_group[group] = [entries[i : i + batch_size] for i in range(0, total, batch_size)]
    cursors = {g: iter(b) for g, b in per_group.items()}
    return [next(cursors[g]) for g in group_order(batches, seed, epoch)]


class ShardSamples(torch.utils.data.Dataset):
    """Map-style dataset: (group, position, flip) -> one transformed sample, or the error it raised."""

    def __init__(self, refs: dict[str, list[SampleRef]], settings: LoaderSettings, decode: bool, num_categories: int):
        self.refs = refs
        self.settings = settings
        self.decode = decode  # False: hand the JPEG bytes to the main process (GPU decode)
        self.num_categories = num_categories  # labels are checked against 1..K when a sample is read

    def __getitem__(self, item: tuple[str, int, bool]) -> dict[str, Any]:
        group, position, flip = item
        ref = self.refs[group][position]
        try:
            return self._load(ref, flip)
        except ShardReadError as e:
            return {"error": e}  # raised in the main process, as one sentence

    def _load(self, ref: SampleRef, flip: bool) -> dict[str, Any]:
        start = time.perf_counter()
        sample = _read_sample(ref, self.num_categories)
        height, width = sample.height, sample.width
        new_h, new_w = resized_size(height, width, self.settings.min_size, self.settings.max_size)
        sx, sy = new_w / width, new_h / height
        boxes = scale_boxes(torch.from_numpy(sample.boxes.copy()), sx, sy)
        verts = scale_vertices(torch.from_numpy(sample.verts.copy()), sx, sy)
        if flip:
            boxes, verts = flip_boxes(boxes, new_w), flip_vertices(verts, new_w)
        out = {
            "image_id": sample.image_id,
            "original": (height, width),
            "resized": (new_h, new_w),
            "flipped": flip,
            "boxes": boxes,
            "labels": torch.from_numpy(sample.labels.astype(np.int64)),
            "verts": verts,
            "polys": torch.from_numpy(sample.polys.copy()),
            "jpeg": torch.frombuffer(bytearray(sample.jpeg), dtype=torch.uint8),
            "source": (ref.tar, sample.key),
            "times": {"read": time.perf_counter() - start},
        }
        if self.decode:
            decode_and_transform([out], self.settings, torch.device("cpu"))
        return out


def _read_sample(ref: SampleRef, num_categories: int):
    """Read one sample and check it (shard_format.decode_sample: checksums, json, labels, boxes, polygons)."""
    try:
        with open(ref.tar, "rb") as f:
            members = {}
            for component, (offset, size) in ref.members.items():
                f.seek(offset)
                members[component] = f.read(size)
        if any(len(members[c]) != ref.members[c][1] for c in members):
            raise ShardFormatError("the tar ends before a member the index lists")
    except (OSError, ShardFormatError) as e:
        raise shard_error(ref.tar, f"cannot read this sample ({e})", ref.key) from None
    try:
        return decode_sample(members, ref.key, num_categories)
    except ShardFormatError as e:
        raise shard_error(ref.tar, str(e), ref.key) from None


def find_damaged_sample(shards: GroupShards, num_categories: int) -> ShardReadError | None:
    """The error naming the first sample in `shards` that fails the format's checks or does not decode, if any."""
    for tar, index in zip(shards.tars, shards.indices):
        for row in read_index(index):
            try:
                sample = _read_sample(SampleRef(tar, row.members, row.key), num_categories)
            except ShardReadError as e:
                return e
            try:
                decode_jpeg(torch.frombuffer(bytearray(sample.jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError as e:
                return shard_error(tar, f"the JPEG does not decode ({e})", row.key)
    return None


def decode_and_transform(samples: list[dict[str, Any]], settings: LoaderSettings, device: torch.device) -> None:
    """Decode each sample's JPEG on `device` (batched on CUDA) and apply flip and resize in place."""
    start = time.perf_counter()
    try:
        images = decode_jpeg([s["jpeg"] for s in samples], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = [_decode_one(s, device) for s in samples]  # find and name the sample that fails
    decoded = time.perf_counter()
    for sample, image in zip(samples, images):
        if tuple(image.shape[1:]) != sample["original"]:
            tar, key = sample["source"]
            raise shard_error(tar, f"the JPEG is {tuple(image.shape[1:])} but its json says {sample['original']}", key)
        sample["image"] = transform_image(image, sample["resized"], sample["flipped"])
        del sample["jpeg"]
    per_sample = 1.0 / len(samples)
    for sample in samples:
        sample["times"]["decode"] = (decoded - start) * per_sample
        sample["times"]["augment"] = (time.perf_counter() - decoded) * per_sample


def _decode_one(sample: dict[str, Any], device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(sample["jpeg"], mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        tar, key = sample["source"]
        raise shard_error(tar, f"the JPEG does not decode ({e})", key) from None


def collate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the samples as a list; images are padded once they exist (after a GPU decode, if any)."""
    return samples


def pad_batch(
    samples: list[dict[str, Any]],
    settings: LoaderSettings,
    bucket: tuple[int, int] | None,
    maxima: tuple[int, int, int],
    buffers: BufferPool | None = None,
) -> Batch:
    """Pad images (to the bucket, or the batch's largest size rounded up) and ground truth (to the maxima)."""
    max_instances, max_polygons, max_vertices = maxima
    for s in samples:
        if len(s["boxes"]) > max_instances or len(s["polys"]) > max_polygons or len(s["verts"]) > max_vertices:
            tar, key = s["source"]
            raise shard_error(tar, "the sample has more instances, polygons or vertices than manifest.json's maxima", key)
    original = torch.tensor([s["original"] for s in samples], dtype=torch.int32)
    resized = torch.tensor([s["resized"] for s in samples], dtype=torch.int32)
    image_ids = torch.tensor([s["image_id"] for s in samples], dtype=torch.int64)
    if bucket is not None:
        check_fits_bucket(resized, bucket, image_ids)
    shape = padded_shape(resized, bucket, settings.size_divisibility)
    images = pad_images([s["image"] for s in samples], shape, samples[0]["image"].device, buffers)

    def padded(name: str, rows: int, fill: float) -> torch.Tensor:
        first = samples[0][name]
        out = first.new_full((len(samples), rows, *first.shape[1:]), fill)
        for i, s in enumerate(samples):
            out[i, : len(s[name])] = s[name]
        return out

    num_boxes = torch.tensor([len(s["boxes"]) for s in samples], dtype=torch.int32)
    num_polys = torch.tensor([len(s["polys"]) for s in samples], dtype=torch.int32)
    polys = padded("polys", max_polygons, 0)
    polys[..., 0][torch.arange(max_polygons) >= num_polys[:, None]] = -1  # padding rows are (-1, 0, 0)
    return Batch(
        images=images,
        image_sizes=resized,
        original_sizes=original,
        scales=resized.float() / original.float(),
        flipped=torch.tensor([s["flipped"] for s in samples]),
        image_ids=image_ids,
        boxes=padded("boxes", max_instances, 0.0),
        labels=padded("labels", max_instances, 0),
        num_boxes=num_boxes,
        verts=padded("verts", max_vertices, 0.0),
        polys=polys.int(),
        num_polys=num_polys,
    )


class _PlanSampler:
    """The batch sampler handed to the DataLoader: the current epoch's remaining plan."""

    def __init__(self):
        self.batches: list[list[tuple[str, int, bool]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchLoader(LoaderBase):
    """Iterable over `Batch` for one rank; see pipeline/loader.py for the contract."""

    def __init__(self, shard_set: ShardSet, settings: LoaderSettings, **placement: Any):
        """`placement`: the keywords of `LoaderBase` (training, batch_size, rank, world_size, seed, device)."""
        super().__init__(shard_set, settings, **placement)
        self.maxima = tuple(max(m, 1) for m in (shard_set.max_instances, shard_set.max_polygons, shard_set.max_vertices))
        self._sampler = _PlanSampler()
        workers = settings.num_threads
        self._loader = torch.utils.data.DataLoader(
            ShardSamples(
                sample_refs(shard_set), settings, decode=not self.decode_on_device,
                num_categories=shard_set.num_categories,
            ),
            batch_sampler=self._sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=settings.prefetch if workers > 0 else None,
        )

    def _epoch_batches(self, epoch: int, start: int, resume: dict[str, Any] | None) -> Iterator[Batch]:
        """The epoch's plan from batch `start` on: a resume replays the plan, skipping batches without decoding."""
        plan = epoch_plan(
            self.shard_set,
            training=self.training,
            flip_prob=self.settings.flip_prob,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
        )
        self._sampler.batches = plan[start:]
        batches = iter(self._loader)
        for entries in self._sampler.batches:
            with self.timer.measure("wait"):
                samples = next(batches)
            yield self._finish(samples, entries[0][0])

    def _finish(self, samples: list[dict[str, Any]], group: str) -> Batch:
        for s in samples:
            if "error" in s:
                raise s["error"]
        with self._on_copy_stream():
            if self.decode_on_device:
                decode_and_transform(samples, self.settings, self.device)
            for s in samples:
                for stage, seconds in s["times"].items():
                    self.timer.add(stage, seconds)
            bucket = None if self.settings.buckets is None else self.settings.buckets[group]
            with self.timer.measure("collate"):
                batch = pad_batch(samples, self.settings, bucket, self.maxima, self._buffers)
                batch = batch.to(self.device, non_blocking=True)
        return self._hand_over(batch)
