"""The shard format, defined once: the sharder writes through it and every reader decodes with it.

A shard set is a folder holding `manifest.json` and tars named `{split}-{group}-{NNNNNN}.tar`,
each with its DALI index (`.idx`, the wds2idx v1.2 text format) beside it. A sample is a key
(the zero-padded image id) and seven components:

  jpg     the original JPEG bytes
  json    {"image_id", "file_name", "height", "width"}
  boxes   float32 [N, 4]  xyxy in continuous source-pixel coordinates, clipped to the image
  labels  int32   [N]     contiguous category ids 1..K (the manifest maps them to COCO ids)
  polys   int32   [P, 3]  (instance index, first vertex, end vertex) into `verts`
  verts   float32 [V, 2]  polygon vertices (x, y) in the same coordinates as `boxes`
  crc32   uint32  [6]     zlib.crc32 of each component above, in this order

Arrays are headerless little-endian, so DALI's webdataset reader takes them with `dtypes`
and the torch fallback with `np.frombuffer`; an empty array is a zero-byte member.

What every sample satisfies, checked by `decode_sample` whenever a loader reads one (so damage
that still parses stops the run instead of training on it, and the check exists once):
- each component matches its crc32 (a flipped byte anywhere, pixels included);
- the json decodes, and its image id is the sample's key;
- one label per box, each in 1..K (K = the manifest's categories);
- boxes finite, inside the image (up to BOX_TOLERANCE) and of positive width and height;
- vertices finite; `polys` rows in instance order (an instance may have none: the reference keeps
  an instance whose polygons were all unusable), each polygon at least 3 vertices, and together
  covering `verts` in order.
Format 2 added the crc32 component; format 3 applies the reference's ground-truth rules (boxes of
width or height <= 1 pixel dropped, instances without a valid polygon kept) and its grouping
(square images with the portraits), so a format 2 set holds other instances than the reference
trains on. A folder of another format is refused with
a request to re-shard.

Reading (both loaders): `open_shard_set` opens a folder as a `ShardSet` (shards per orientation
group, sample counts, maxima, every index read once) after the cheap checks that catch a broken
set before any reader starts (missing or empty folder, a tar or index missing, a tar whose size
differs from the manifest, an index whose count or offsets do not fit its tar); `tools/shard_coco.py --verify` is
the full check (sha256 and every member). `read_sample(ref)` then reads one sample by the `.idx`
offsets, not by streaming the tars with the `webdataset` library: an exact per-epoch
permutation, the per-rank sample ranges and a mid-epoch resume that skips batches without
reading them all need random access, which a tar stream cannot give (a sample is a few reads at
known offsets, about 0.1 ms per COCO image). Every sample either backend batches passes through
`read_sample` with its JPEG bytes and arrays, before any decode, so that is where
`decode_sample`'s check runs. Errors a user can cause are `ShardReadError`s: one sentence naming
the shard (and the sample key where known) and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, Union

import numpy as np

FORMAT = "coco-wds/3"
MANIFEST_NAME = "manifest.json"
GROUPS = ("landscape", "portrait")
KEY_DIGITS = 12  # COCO file names use 12-digit zero-padded image ids
SHARD_STEM = rf"[A-Za-z0-9_.]+-(?:{'|'.join(GROUPS)})-\d{{6}}"  # `{split}-{group}-{NNNNNN}`
SHARD_NAME = re.compile(rf"{SHARD_STEM}\.tar")
# The sharder clips boxes to the image exactly; the tolerance only absorbs float rounding in
# other writers' arithmetic, while damage that still parses (a sign or exponent bit) lands far outside.
BOX_TOLERANCE = 0.01  # pixels

# Component -> (numpy dtype, shape of one row).
ARRAY_COMPONENTS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "boxes": (np.dtype("<f4"), (4,)),
    "labels": (np.dtype("<i4"), ()),
    "polys": (np.dtype("<i4"), (3,)),
    "verts": (np.dtype("<f4"), (2,)),
}
CHECKED_COMPONENTS = ("jpg", "json", *ARRAY_COMPONENTS)  # what the crc32 component covers, in its order
CHECKSUM = "crc32"
CHECKSUM_DTYPE = np.dtype("<u4")
COMPONENTS = (*CHECKED_COMPONENTS, CHECKSUM)

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]  # a component's bytes as a reader holds them


class ShardFormatError(ValueError):
    """A shard or manifest does not follow this format; the message names the file."""


def orientation(height: int, width: int) -> str:
    """The shard group of an image: `portrait` when h >= w, else `landscape`.

    As the reference's aspect-ratio grouping (`bisect_right([1], h / w)`), which puts squares
    with the portraits; either bucket holds a square after the resize.
    """
    return "portrait" if height >= width else "landscape"


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


def decode_array(name: str, data: Buffer) -> np.ndarray:
    dtype, row = ARRAY_COMPONENTS[name]
    row_bytes = dtype.itemsize * math.prod(row)
    size = memoryview(data).nbytes
    if size % row_bytes:
        raise ShardFormatError(f"the {name} member has {size} bytes, not a whole number of {row_bytes}-byte rows")
    return np.frombuffer(data, dtype=dtype).reshape((-1, *row))


def checksums(members: Mapping[str, Buffer]) -> bytes:
    """The crc32 component: zlib.crc32 of each of CHECKED_COMPONENTS (tens of microseconds per image)."""
    return np.array([zlib.crc32(members[c]) for c in CHECKED_COMPONENTS], CHECKSUM_DTYPE).tobytes()


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
    members[CHECKSUM] = checksums(members)
    return members


def decode_sample(members: Mapping[str, Buffer], key: str, num_categories: int) -> Sample:
    """Inverse of `encode_sample`, after checking everything the module docstring lists.

    `members` maps component names to their bytes, `key` is the sample's key in the tar and
    `num_categories` the manifest's K. Raises ShardFormatError saying what is wrong, for the
    caller to name the shard and key; both loaders and `--verify` read samples through here.
    """
    missing = [c for c in COMPONENTS if c not in members]
    if missing:
        raise ShardFormatError(f"the sample lacks the components {missing}")
    _check_checksums(members)
    sample = Sample(
        **_decode_meta(members["json"], key),
        jpeg=bytes(members["jpg"]),
        **{name: decode_array(name, members[name]) for name in ARRAY_COMPONENTS},
    )
    check_ground_truth(sample, num_categories)
    return sample


def _check_checksums(members: Mapping[str, Buffer]) -> None:
    stored = members[CHECKSUM]
    expected_size = CHECKSUM_DTYPE.itemsize * len(CHECKED_COMPONENTS)
    if memoryview(stored).nbytes != expected_size:
        raise ShardFormatError(
            f"the {CHECKSUM} member has {memoryview(stored).nbytes} bytes, not {expected_size} (the shard is damaged)"
        )
    for component, crc in zip(CHECKED_COMPONENTS, np.frombuffer(stored, CHECKSUM_DTYPE)):
        if zlib.crc32(members[component]) != crc:
            raise ShardFormatError(f"the {component} member does not match its {CHECKSUM} (the shard is damaged)")


_META_FIELDS = {"image_id": int, "file_name": str, "height": int, "width": int}


def _decode_meta(data: Buffer, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(data))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ShardFormatError(f"the json member does not decode ({e})") from None
    if not isinstance(meta, dict):
        raise ShardFormatError("the json member is not an object")
    for field, kind in _META_FIELDS.items():
        if type(meta.get(field)) is not kind:  # `type`, so that true/false is no number
            raise ShardFormatError(f"the json member lacks a valid {field!r}")
    if meta["height"] < 1 or meta["width"] < 1:
        raise ShardFormatError(f"the json member gives an image of {meta['width']}x{meta['height']} pixels")
    if sample_key(meta["image_id"]) != key:
        raise ShardFormatError(f"the json member names image {meta['image_id']}, not the sample's key")
    return {field: meta[field] for field in _META_FIELDS}


def check_ground_truth(sample: Sample, num_categories: int) -> None:
    """The format's invariants on one sample's arrays; raises ShardFormatError naming the first one broken.

    Written as few whole-array operations (and a plain loop over the few polygon rows), because
    every loader runs it on every image it reads.
    """
    boxes, labels, polys, verts = sample.boxes, sample.labels, sample.polys, sample.verts
    if len(labels) != len(boxes):
        raise ShardFormatError(f"the sample has {len(labels)} labels for {len(boxes)} boxes")
    if len(labels) and (labels.min() < 1 or labels.max() > num_categories):
        outside = labels[(labels < 1) | (labels > num_categories)][0]
        raise ShardFormatError(f"label {outside} is outside 1..{num_categories} (the manifest's categories)")
    if len(boxes):
        if not np.isfinite(boxes).all():
            raise ShardFormatError("a box coordinate is not finite")
        low, high = boxes[:, :2], boxes[:, 2:]
        tolerance = BOX_TOLERANCE
        if low.min() < -tolerance or high[:, 0].max() > sample.width + tolerance \
                or high[:, 1].max() > sample.height + tolerance or (high <= low).any():
            bad = (low < -tolerance).any(1) | (high > [sample.width + tolerance, sample.height + tolerance]).any(1) \
                | (high <= low).any(1)
            raise ShardFormatError(
                f"box {boxes[bad][0].tolist()} (xyxy) is empty or outside the {sample.width}x{sample.height} image"
            )
    if len(verts) and not np.isfinite(verts).all():
        raise ShardFormatError("a polygon vertex is not finite")
    if not _polygon_rows_are_consistent(polys, len(labels), len(verts)):
        raise ShardFormatError("the polys rows do not index the instances and vertices in order")


def _polygon_rows_are_consistent(polys: np.ndarray, num_instances: int, num_verts: int) -> bool:
    """Rows in instance order (instances without a row allowed), polygons of >= 3 vertices, covering `verts` in order."""
    previous, cursor = -1, 0
    for instance, first, end in polys.tolist():
        if instance < max(previous, 0) or instance >= num_instances or first != cursor or end - first < 3:
            return False
        previous, cursor = instance, end
    return cursor == num_verts


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
    appears under its final name only when it is whole; a failed write leaves neither behind.
    """
    path = Path(path)
    tmp_tar = path.with_name(path.name + ".tmp")
    tmp_idx = path.with_name(index_name(path.name) + ".tmp")
    try:
        with open(tmp_tar, "wb") as raw:
            hashed = _HashingWriter(raw)
            index_rows = _write_tar(hashed, samples)
        tmp_idx.write_text(f"v1.2 {len(index_rows)}\n" + "".join(r + "\n" for r in index_rows))
        os.replace(tmp_idx, path.with_name(index_name(path.name)))
        os.replace(tmp_tar, path)
    except BaseException:
        tmp_tar.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
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


class IndexRow(NamedTuple):
    """One sample of a wds2idx index: its key, and component -> (data offset, size) in the tar."""

    key: str
    members: dict[str, tuple[int, int]]


def read_index(path: Path) -> list[IndexRow]:
    """Parse a wds2idx v1.2 index (lines of `component offset size member-name` quadruples)."""
    fix = "re-run tools/shard_coco.py"
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path}: cannot read the index ({e}); {fix}") from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != "v1.2" or not header[1].isdecimal():
        raise ShardFormatError(f"{path}: not a wds2idx v1.2 index; {fix}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        row = _parse_index_line(line)
        if row is None:
            raise ShardFormatError(f"{path}: line {number} is not a valid index line ({line[:60]!r}); {fix}")
        rows.append(row)
    if len(rows) != int(header[1]):
        raise ShardFormatError(f"{path}: header says {header[1]} samples, found {len(rows)}; {fix}")
    return rows


def _parse_index_line(line: str) -> IndexRow | None:
    fields = line.split()
    if not fields or len(fields) % 4:
        return None
    members = {}
    keys = set()
    for component, offset, size, member in zip(*[iter(fields)] * 4):
        if not (offset.isdecimal() and size.isdecimal()) or not member.endswith("." + component):
            return None
        members[component] = (int(offset), int(size))
        keys.add(member[: -len(component) - 1])
    return IndexRow(keys.pop(), members) if len(keys) == 1 and len(members) == len(fields) // 4 else None


@dataclass(frozen=True)
class IndexTable:
    """A wds2idx index as arrays: a few bytes a sample and no Python object per sample.

    A loader holds every sample's offsets for a whole run (117k samples for COCO), and its
    DataLoader workers are forked from it: per-sample objects (a dict each) took about 1.3 KB a
    sample, and their reference counts make every forked worker copy the pages it touches.
    """

    keys: np.ndarray  # [N] str: each sample's key
    spans: np.ndarray  # [N, len(COMPONENTS), 2] int64: each component's (data offset, size); -1 where it is absent

    def __len__(self) -> int:
        return len(self.keys)

    def members(self, index: int) -> dict[str, tuple[int, int]]:
        """Component -> (data offset, size) of sample `index`, as `IndexRow.members`."""
        return {c: (offset, size) for c, (offset, size) in zip(COMPONENTS, self.spans[index].tolist()) if offset >= 0}

    @classmethod
    def of_rows(cls, rows: list[IndexRow]) -> "IndexTable":
        absent = (-1, -1)
        return cls(
            keys=np.array([row.key for row in rows], dtype=str),
            spans=np.array([[row.members.get(c, absent) for c in COMPONENTS] for row in rows], dtype=np.int64).reshape(
                len(rows), len(COMPONENTS), 2
            ),
        )


def read_index_table(path: Path) -> IndexTable:
    """`read_index` as an IndexTable, without a Python object per sample.

    An index in the sharder's own layout (each line the components of COMPONENTS in order) is
    checked and converted in bulk; any other goes through `read_index`, which accepts every valid
    index and names the first bad line of an invalid one.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return IndexTable.of_rows(read_index(path))  # raises the sentence
    lines = text.splitlines()
    tokens = text.split()
    count = int(tokens[1]) if len(tokens) >= 2 and tokens[0] == "v1.2" and tokens[1].isdecimal() else -1
    if count < 0 or len(lines) != count + 1 or len(tokens) != 2 + count * 4 * len(COMPONENTS) or not all(lines):
        return IndexTable.of_rows(read_index(path))
    components, offsets, sizes, names = (tokens[start::4] for start in range(2, 6))
    keys = np.array([name[: -len(COMPONENTS[0]) - 1] for name in names[:: len(COMPONENTS)]], dtype=str)
    expected_names = np.strings.add(np.strings.add(keys[:, None], "."), np.array(COMPONENTS)[None, :]).ravel()
    if components != list(COMPONENTS) * count or not all(map(str.isdecimal, offsets)) \
            or not all(map(str.isdecimal, sizes)) or not (np.array(names, dtype=str) == expected_names).all():
        return IndexTable.of_rows(read_index(path))
    spans = np.stack([np.fromiter(map(int, column), np.int64, len(column)) for column in (offsets, sizes)], axis=1)
    return IndexTable(keys=keys, spans=spans.reshape(count, len(COMPONENTS), 2))


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """Load and check `manifest.json` of a shard folder, with one clear error when it is unusable."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST_NAME
    if not shard_dir.is_dir():
        raise ShardFormatError(f"{shard_dir}: no such shard folder; create it with tools/shard_coco.py")
    if not path.is_file():
        raise ShardFormatError(f"{path} is missing; create the shards with tools/shard_coco.py")
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise ShardFormatError(f"cannot read {path} ({e.strerror}); make it readable") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise ShardFormatError(f"{path} is not valid JSON ({e}); re-run tools/shard_coco.py") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ShardFormatError(
            f"{path} has format {found!r}, this code reads {FORMAT!r}; re-shard with tools/shard_coco.py"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardFormatError(f"{path}: {problem} (edited, or written by another tool?); re-shard with tools/shard_coco.py")
    return manifest


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a manifest unusable to the readers, or None: the fields they rely on, with their types."""
    for field in ("samples", "max_instances", "max_polygons", "max_vertices"):
        if not _is_count(manifest.get(field)):
            return f"{field!r} is missing or not a count"
    categories = manifest.get("categories")
    if not isinstance(categories, list) or not categories:
        return "'categories' is missing or empty"
    for number, category in enumerate(categories, start=1):
        if not isinstance(category, dict) or category.get("id") != number or type(category.get("coco_id")) is not int \
                or not isinstance(category.get("name"), str):
            return f"category {number} is not {{'id': {number}, 'coco_id': int, 'name': str}}"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "'shards' is missing or not a list"
    for entry in shards:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name) or entry.get("group") != name.split("-")[-2]:
            return f"shard entry {name!r} has no valid name and group"
        for field in ("samples", "bytes"):
            if not _is_count(entry.get(field)):
                return f"shard {name}: {field!r} is missing or not a count"
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"shard {name}: 'sha256' is missing or not 64 hex digits"
    if sum(entry["samples"] for entry in shards) != manifest["samples"]:
        return f"'samples' is {manifest['samples']} but the shards hold {sum(e['samples'] for e in shards)}"
    return None


def write_manifest(shard_dir: Path, manifest: dict[str, Any]) -> None:
    path = Path(shard_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --- A shard folder as the loaders see it (opened once per loader) ---

VERIFY_HINT = "re-run tools/shard_coco.py --verify --out {folder} (and re-shard if it fails)"


class ShardReadError(ShardFormatError):
    """A shard cannot be read or decoded; the message names the shard, the sample key where known, and the fix."""


def shard_error(path: str | Path, problem: str, key: str | None = None) -> ShardReadError:
    """`path` is a shard, an index or the shard folder itself."""
    path = Path(path)
    where = f"{path}" + (f" (sample {key})" if key else "")
    folder = path if path.is_dir() else path.parent
    return ShardReadError(f"{where}: {problem}; {VERIFY_HINT.format(folder=folder)}")


@dataclass(frozen=True)
class GroupShards:
    """The shards of one orientation group, in manifest order (the order every reader uses)."""

    tars: tuple[Path, ...]
    counts: tuple[int, ...]  # samples per tar
    tables: tuple[IndexTable, ...]  # each tar's index, read once when the set is opened

    @property
    def indices(self) -> tuple[Path, ...]:
        return tuple(t.with_name(index_name(t.name)) for t in self.tars)

    @property
    def samples(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class ShardSet:
    folder: Path
    manifest: dict[str, Any]
    groups: dict[str, GroupShards]

    @property
    def samples(self) -> dict[str, int]:
        return {group: shards.samples for group, shards in self.groups.items()}

    @property
    def max_instances(self) -> int:
        return int(self.manifest["max_instances"])

    @property
    def max_polygons(self) -> int:
        return int(self.manifest["max_polygons"])

    @property
    def max_vertices(self) -> int:
        return int(self.manifest["max_vertices"])

    @property
    def num_categories(self) -> int:
        """K: every stored label is in 1..K."""
        return len(self.manifest["categories"])


def open_shard_set(folder: str | Path) -> ShardSet:
    """Read the manifest and run the cheap consistency checks; raises ShardReadError naming the bad file."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ShardFormatError as e:
        raise ShardReadError(str(e)) from None
    entries = manifest.get("shards") or []
    if not entries:
        raise ShardReadError(
            f"{folder}/manifest.json lists no shards (empty shard folder); re-run tools/shard_coco.py to write them"
        )
    groups: dict[str, tuple[list[Path], list[int], list[IndexTable]]] = {g: ([], [], []) for g in GROUPS}
    for entry in entries:
        tar = folder / entry["name"]
        tars, counts, tables = groups[entry["group"]]
        tars.append(tar)
        counts.append(int(entry["samples"]))
        tables.append(_checked_index(tar, entry))
    return ShardSet(
        folder=folder,
        manifest=manifest,
        groups={g: GroupShards(tuple(t), tuple(c), tuple(r)) for g, (t, c, r) in groups.items()},
    )


def _checked_index(tar: Path, entry: dict[str, Any]) -> IndexTable:
    """The shard's index, after checking it and the tar against the manifest entry."""
    index = tar.with_name(index_name(tar.name))
    if not tar.is_file():
        raise shard_error(tar, "the shard listed in manifest.json is missing")
    if not index.is_file():
        raise shard_error(index, "the index of this shard is missing")
    size = tar.stat().st_size
    if size != entry["bytes"]:
        raise shard_error(tar, f"the tar has {size} bytes but manifest.json says {entry['bytes']} (truncated?)")
    try:
        samples = read_index_table(index)
    except ShardFormatError as e:
        raise shard_error(index, f"unreadable index ({e})") from None
    if len(samples) != entry["samples"]:
        raise shard_error(index, f"the index lists {len(samples)} samples but manifest.json says {entry['samples']}")
    if len(samples):
        _check_index_matches_tar(tar, index, samples, size)
    return samples


def _check_index_matches_tar(tar: Path, index: Path, samples: IndexTable, size: int) -> None:
    """Every member must lie inside the tar, and the first and last must sit where the index says.

    Reading two tar headers is enough to catch an index written for another tar without
    scanning the shard (the full member-by-member check is `--verify`).
    """
    offsets, lengths = samples.spans[..., 0], samples.spans[..., 1]
    end = int((offsets + lengths)[offsets >= 0].max(initial=0))
    if end > size:
        raise shard_error(index, f"the index points past the end of {tar.name} (byte {end} of {size})")
    with open(tar, "rb") as f:
        for position in (0, len(samples) - 1):
            members = samples.members(position)
            if not members:
                continue  # read_sample names the components it lacks
            component, (offset, length) = next(iter(members.items()))
            f.seek(offset - tarfile.BLOCKSIZE)
            try:
                header = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
            except tarfile.TarError:
                header = None
            if header is None or header.size != length or header.name != f"{samples.keys[position]}.{component}":
                raise shard_error(index, f"the index does not match the members of {tar.name}")


# --- Random access to single samples, through the DALI indices beside the tars ---

@dataclass(frozen=True)
class SampleRef:
    """What reading one sample needs: its tar, component -> (offset, size) and key from the index, and K.

    `num_categories` (the manifest's K, every label in 1..K) rides along so that `read_sample`
    can check a sample wherever a backend reads it, without the backend passing it in.
    """

    tar: Path
    members: dict[str, tuple[int, int]]
    key: str
    num_categories: int


class SampleRefs(Sequence[SampleRef]):
    """The samples of one orientation group in the order DALI's readers number them (shard order,
    then index order), as the shards' index tables: each SampleRef is made when it is asked for."""

    def __init__(self, tars: Sequence[Path], tables: Sequence[IndexTable], num_categories: int):
        self.tars = tuple(tars)
        self.tables = tuple(tables)
        self.num_categories = num_categories
        self.starts = np.cumsum([0] + [len(t) for t in self.tables])  # each shard's first position

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, position: int) -> SampleRef:  # type: ignore[override]
        if not 0 <= position < len(self):
            raise IndexError(f"sample {position} of {len(self)}")
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        table, row = self.tables[shard], position - int(self.starts[shard])
        return SampleRef(self.tars[shard], table.members(row), str(table.keys[row]), self.num_categories)


def sample_refs(shard_set: ShardSet) -> dict[str, SampleRefs]:
    """Every sample of each group, in the order DALI's readers number them (shard order, then index order)."""
    return {
        group: SampleRefs(shards.tars, shards.tables, shard_set.num_categories)
        for group, shards in shard_set.groups.items()
    }


def read_sample(ref: SampleRef) -> Sample:
    """The sample at `ref`, checked; raises ShardReadError naming the tar and key when it cannot be read or is damaged."""
    return checked_sample(ref, read_members(ref))


def read_members(ref: SampleRef) -> dict[str, bytes]:
    """The bytes of each component of the sample at `ref` (the file reads of `read_sample`, unchecked)."""
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
    return members


def checked_sample(ref: SampleRef, members: Mapping[str, Buffer]) -> Sample:
    """`read_members(ref)`'s bytes as a Sample, after `decode_sample`'s check (the check of `read_sample`)."""
    try:
        return decode_sample(members, ref.key, ref.num_categories)
    except ShardFormatError as e:
        raise shard_error(ref.tar, str(e), ref.key) from None
