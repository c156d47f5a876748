"""Random access to single samples of a shard set, through the DALI indices beside the tars.

Both backends read samples this way (the epoch plan, pipeline/epoch_plan.py, says which): by the
`.idx` offsets rather than by streaming the tars with the `webdataset` library, because an exact
per-epoch permutation, the per-rank sample ranges and a mid-epoch resume that skips batches
without reading them all need random access, which a tar stream cannot give. A sample's
members are a few reads at known offsets (about 0.1 ms per COCO image). Every sample either
backend batches passes through `read_sample` with its JPEG bytes and arrays, before any decode,
so that is where the shard format's per-sample check runs (`shard_format.decode_sample`:
checksums, json, labels, boxes, polygon rows): damage that still parses stops the run there, in
one sentence naming the shard and the sample key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.shard_format import Sample, ShardFormatError, decode_sample, read_index
from pipeline.shard_set import ShardSet, shard_error


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


def sample_refs(shard_set: ShardSet) -> dict[str, list[SampleRef]]:
    """Every sample of each group, in the order DALI's readers number them (shard order, then index order)."""
    k = shard_set.num_categories
    return {
        group: [
            SampleRef(tar, row.members, row.key, k) for tar, index in zip(shards.tars, shards.indices)
            for row in read_index(index)
        ]
        for group, shards in shard_set.groups.items()
    }


def read_sample(ref: SampleRef) -> Sample:
    """The sample at `ref`, checked; raises ShardReadError naming the tar and key when it cannot be read or is damaged."""
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
        return decode_sample(members, ref.key, ref.num_categories)
    except ShardFormatError as e:
        raise shard_error(ref.tar, str(e), ref.key) from None
