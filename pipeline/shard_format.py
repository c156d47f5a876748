"""The shard format, defined once: the sharder writes through it and every reader decodes with it.

A shard set is a folder holding `manifest.json` and tars named `{split}-{group}-{NNNNNN}.tar`,
each with its DALI index (`.idx`, the wds2idx v1.2 text format) beside it. A sample is a key
(the zero-padded image id) and six components:

  jpg     the original JPEG bytes
  json    {"image_id", "file_name", "height", "width"}
  boxes   float32 [N, 4]  xyxy in continuous source-pixel coordinates, clipped to the image
  labels  int32   [N]     contiguous category ids 1..K (the manifest maps them to COCO ids)
  polys   int32   [P, 3]  (instance index, first vertex, end vertex) into `verts`
  verts   float32 [V, 2]  polygon vertices (x, y) in the same coordinates as `boxes`

Arrays are headerless little-endian, so DALI's webdataset reader takes them with `dtypes`
and the torch fallback with `np.frombuffer`; an empty array is a zero-byte member.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

FORMAT = "coco-wds/1"
MANIFEST_NAME = "manifest.json"
GROUPS = ("landscape", "portrait")
KEY_DIGITS = 12  # COCO file names use 12-digit zero-padded image ids

# Component -> (numpy dtype, shape of one row); `None` marks a non-array component.
ARRAY_COMPONENTS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "boxes": (np.dtype("<f4"), (4,)),
    "labels": (np.dtype("<i4"), ()),
    "polys": (np.dtype("<i4"), (3,)),
    "verts": (np.dtype("<f4"), (2,)),
}
COMPONENTS = ("jpg", "json", *ARRAY_COMPONENTS)


class ShardFormatError(ValueError):
    """A shard or manifest does not follow this format; the message names the file."""


def orientation(height: int, width: int) -> str:
    """The shard group of an image: `landscape` when h <= w, else `portrait`."""
    return "landscape" if height <= width else "portrait"


def shard_name(split: str, group: str, index: int) -> str:
    return f"{split}-{group}-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def sample_key(image_id: int) -> str:
    return f"{image_id:0{KEY_DIGITS}d}"


@dataclass
class Sample:
    """One image and its ground truth, as stored in a shard (source pixel coordinates)."""

    image_id: int
    file_name: str
    height: int
    width: int
    jpeg: bytes
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int32 [N]
    polys: np.ndarray  # int32 [P, 3]
    verts: np.ndarray  # float32 [V, 2]

    @property
    def key(self) -> str:
        return sample_key(self.image_id)

    @property
    def group(self) -> str:
        return orientation(self.height, self.width)


def encode_array(name: str, array: np.ndarray) -> bytes:
    dtype, row = ARRAY_COMPONENTS[name]
    array = np.ascontiguousarray(array, dtype=dtype)
    if array.shape[1:] != row:
        raise ValueError(f"component {name!r} must have rows of shape {row}, got {array.shape}")
    return array.tobytes()


def decode_array(name: str, data: bytes) -> np.ndarray:
    dtype, row = ARRAY_COMPONENTS[name]
    return np.frombuffer(data, dtype=dtype).reshape((-1, *row))


def encode_sample(sample: Sample) -> dict[str, bytes]:
    """Component name -> member bytes, in the order they are written to the tar."""
    meta = {
        "image_id": sample.image_id,
        "file_name": sample.file_name,
        "height": sample.height,
        "width": sample.width,
    }
    members = {"jpg": sample.jpeg, "json": json.dumps(meta, sort_keys=True).encode()}
    for name in ARRAY_COMPONENTS:
        members[name] = encode_array(name, getattr(sample, name))
    return members


def decode_sample(members: dict[str, bytes]) -> Sample:
    """Inverse of `encode_sample`; `members` maps component names to bytes."""
    missing = [c for c in COMPONENTS if c not in members]
    if missing:
        raise ShardFormatError(f"sample is missing components {missing}")
    meta = json.loads(members["json"])
    return Sample(
        image_id=int(meta["image_id"]),
        file_name=str(meta["file_name"]),
        height=int(meta["height"]),
        width=int(meta["width"]),
        jpeg=bytes(members["jpg"]),
        **{name: decode_array(name, members[name]) for name in ARRAY_COMPONENTS},
    )


def _tar_member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata, so re-running the sharder reproduces identical bytes
    info.uname = info.gname = ""
    return info


def write_shard(path: Path, samples: Iterable[Sample]) -> dict[str, Any]:
    """Write one tar and its DALI index atomically; returns the manifest entry of the shard.

    Both files are written under temporary names and renamed only when complete, so a shard
    appears under its final name only when it is whole.
    """
    path = Path(path)
    tmp_tar = path.with_name(path.name + ".tmp")
    with open(tmp_tar, "wb") as raw:
        hashed = _HashingWriter(raw)
        index_rows = _write_tar(hashed, samples)
    index_text = f"v1.2 {len(index_rows)}\n" + "".join(r + "\n" for r in index_rows)
    tmp_idx = path.with_name(index_name(path.name) + ".tmp")
    tmp_idx.write_text(index_text)
    os.replace(tmp_idx, path.with_name(index_name(path.name)))
    os.replace(tmp_tar, path)
    return {
        "name": path.name,
        "group": path.name.split("-")[-2],
        "samples": len(index_rows),
        "bytes": path.stat().st_size,
        "sha256": hashed.digest.hexdigest(),
    }


class _HashingWriter:
    """A write-only file that hashes what passes through, so a shard is never read back to hash it."""

    def __init__(self, raw: io.BufferedWriter):
        self.raw = raw
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


def _write_tar(fileobj: _HashingWriter, samples: Iterable[Sample]) -> list[str]:
    """Write the samples as a USTAR tar; returns one wds2idx line per sample."""
    index_rows = []
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
        for sample in samples:
            row = []
            for component, data in encode_sample(sample).items():
                member = f"{sample.key}.{component}"
                # A USTAR header is one 512-byte block, so the member's bytes start right after it.
                data_offset = tar.offset + tarfile.BLOCKSIZE
                tar.addfile(_tar_member(member, data), io.BytesIO(data))
                row.append(f"{component} {data_offset} {len(data)} {member}")
            index_rows.append(" ".join(row))
    return index_rows


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_index(path: Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a wds2idx v1.2 index: per sample, component -> (offset, size)."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise ShardFormatError(f"{path}: not a wds2idx v1.2 index; re-run tools/shard_coco.py")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) % 4:
            raise ShardFormatError(f"{path}: malformed index line {line!r}; re-run tools/shard_coco.py")
        samples.append(
            {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        )
    if len(samples) != int(lines[0].split()[1]):
        raise ShardFormatError(f"{path}: header says {lines[0].split()[1]} samples, found {len(samples)}")
    return samples


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """Load and check `manifest.json` of a shard folder, with one clear error when it is unusable."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST_NAME
    if not shard_dir.is_dir():
        raise ShardFormatError(f"{shard_dir}: no such shard folder; create it with tools/shard_coco.py")
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing; create the shards with tools/shard_coco.py")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path} is not valid JSON ({e}); re-run tools/shard_coco.py") from e
    if manifest.get("format") != FORMAT:
        raise ShardFormatError(
            f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT!r}; re-shard with tools/shard_coco.py"
        )
    return manifest


def write_manifest(shard_dir: Path, manifest: dict[str, Any]) -> None:
    path = Path(shard_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
