"""A shard folder as the loaders see it: shards per orientation group, sample counts, maxima.

Opening a folder runs the cheap checks that catch a broken set before any reader starts
(missing or empty folder, a tar or index missing, a tar whose size differs from the manifest,
an index whose count or offsets do not fit its tar); `tools/shard_coco.py --verify` is the full
check (sha256 and every member). Errors a user can cause are `ShardReadError`s: one sentence
naming the shard (and the sample key where known) and the fix.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.shard_format import GROUPS, IndexRow, ShardFormatError, index_name, read_index, read_manifest

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
    groups: dict[str, tuple[list[Path], list[int]]] = {g: ([], []) for g in GROUPS}
    for entry in entries:
        tar = folder / entry["name"]
        _check_shard(tar, entry)
        tars, counts = groups[entry["group"]]
        tars.append(tar)
        counts.append(int(entry["samples"]))
    return ShardSet(
        folder=folder,
        manifest=manifest,
        groups={g: GroupShards(tuple(t), tuple(c)) for g, (t, c) in groups.items()},
    )


def _check_shard(tar: Path, entry: dict[str, Any]) -> None:
    index = tar.with_name(index_name(tar.name))
    if not tar.is_file():
        raise shard_error(tar, "the shard listed in manifest.json is missing")
    if not index.is_file():
        raise shard_error(index, "the index of this shard is missing")
    size = tar.stat().st_size
    if size != entry["bytes"]:
        raise shard_error(tar, f"the tar has {size} bytes but manifest.json says {entry['bytes']} (truncated?)")
    try:
        samples = read_index(index)
    except ShardFormatError as e:
        raise shard_error(index, f"unreadable index ({e})") from None
    if len(samples) != entry["samples"]:
        raise shard_error(index, f"the index lists {len(samples)} samples but manifest.json says {entry['samples']}")
    if samples:
        _check_index_matches_tar(tar, index, samples, size)


def _check_index_matches_tar(tar: Path, index: Path, samples: list[IndexRow], size: int) -> None:
    """Every member must lie inside the tar, and the first and last must sit where the index says.

    Reading two tar headers is enough to catch an index written for another tar without
    scanning the shard (the full member-by-member check is `--verify`).
    """
    end = max(offset + length for sample in samples for offset, length in sample.members.values())
    if end > size:
        raise shard_error(index, f"the index points past the end of {tar.name} (byte {end} of {size})")
    with open(tar, "rb") as f:
        for sample in (samples[0], samples[-1]):
            component, (offset, length) = next(iter(sample.members.items()))
            f.seek(offset - tarfile.BLOCKSIZE)
            try:
                header = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
            except tarfile.TarError:
                header = None
            if header is None or header.size != length or header.name != f"{sample.key}.{component}":
                raise shard_error(index, f"the index does not match the members of {tar.name}")
