"""Random access to single samples of a shard set, through the DALI indices beside the tars.

Both backends read samples this way (the epoch plan, pipeline/sampling.py, says which): by the
`.idx` offsets rather than by streaming the tars with the `webdataset` library, because an exact
per-epoch permutation, the per-rank sample ranges and a mid-epoch resume that skips batches
without reading them all need random access, which a tar stream cannot give. A sample's
members are a few reads at known offsets (about 0.1 ms per COCO image). Every sample either
backend batches passes through `read_sample` with its JPEG bytes and arrays, before any decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.shard_format import Sample, ShardFormatError, decode_sample, read_index
from pipeline.shard_set import ShardSet, shard_error


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's components sit: its tar and component -> (offset, size) from the index."""

    tar: Path
    members: dict[str, tuple[int, int]]


def sample_refs(shard_set: ShardSet) -> dict[str, list[SampleRef]]:
    """Every sample of each group, in the order DALI's readers number them (shard order, then index order)."""
    return {
        group: [SampleRef(tar, sample) for tar, index in zip(shards.tars, shards.indices) for sample in read_index(index)]
        for group, shards in shard_set.groups.items()
    }


def read_sample(ref: SampleRef) -> Sample:
    """The sample at `ref`; raises ShardReadError naming the tar when it cannot be read."""
    try:
        with open(ref.tar, "rb") as f:
            members = {}
            for component, (offset, size) in ref.members.items():
                f.seek(offset)
                members[component] = f.read(size)
        if any(len(members[c]) != ref.members[c][1] for c in members):
            raise ShardFormatError("the tar ends before a member the index lists")
        return decode_sample(members)
    except (OSError, ValueError) as e:
        raise shard_error(ref.tar, f"cannot read this sample ({e})") from None
