"""Which samples each rank reads in an epoch, in which order: the plan both backends share.

- Ranks: the samples of each orientation group are split into contiguous ranges exactly as
  DALI's readers split them (`shard_range`); in training the range a rank reads moves by one
  every epoch (`reader_shard`), as DALI does without `stick_to_shard`, so every rank sees the
  whole set over `world_size` epochs.
- Length: every rank yields the same number of batches per group (`batches_per_rank`), the
  shortest ranges being padded by repeating their last sample (DALI's `pad_last_batch`), so
  distributed ranks never wait on each other at the end of an epoch. In evaluation the padded
  entries are recognizable as image ids already seen earlier on the same rank.
- Order: which group the next batch comes from is drawn in proportion to the batches each group
  has left (`group_order`), seeded by (seed, epoch) only, so every rank uses the same bucket
  shape at the same step.
- `epoch_plan` puts it together for both backends: a rank's batches of an epoch as lists of
  (group, sample position, flip coin), the permutation and the coins seeded by
  (seed, epoch, rank, group), so an epoch depends on those alone and a resume replays it.

Every random stream of a run is seeded this way, by numpy's `SeedSequence` over the words that
name it (`seed_sequence`, `derived_seed`; train/distributed.py seeds each rank's generators
with them): sequences of different words never collide, where sums like seed + rank do
((1, 0) and (0, 1)).
"""

from __future__ import annotations

import numpy as np

from pipeline.shard_format import GROUPS, ShardSet


def seed_sequence(*words: int) -> np.random.SeedSequence:
    """The seed of the stream named by `words` (the run's seed first), e.g. (seed, epoch)."""
    return np.random.SeedSequence(words)


def derived_seed(*words: int) -> int:
    """A 32-bit integer seed from `seed_sequence(*words)`, for generators that take an int
    (Python's `random`, numpy's legacy global one, torch)."""
    return int(seed_sequence(*words).generate_state(1, np.uint32)[0])


def shard_range(num_samples: int, shard_id: int, num_shards: int) -> range:
    """The sample positions DALI gives reader shard `shard_id` of `num_shards`."""
    return range(num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards)


def reader_shard(rank: int, world_size: int, epoch: int, training: bool) -> int:
    return (rank + epoch) % world_size if training else rank


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields for a group: the largest range, rounded up to whole batches."""
    largest = -(-num_samples // world_size)
    return -(-largest // batch_size)


def group_batches(samples: dict[str, int], world_size: int, batch_size: int) -> dict[str, int]:
    """Batches per rank of each group, from the groups' sample counts."""
    return {group: batches_per_rank(n, world_size, batch_size) for group, n in samples.items()}


def group_order(batches: dict[str, int], seed: int, epoch: int) -> list[str]:
    """The group of every batch of an epoch, drawn in proportion to the batches each has left."""
    rng = np.random.default_rng(seed_sequence(seed, epoch))
    remaining = dict(batches)
    order = []
    for _ in range(sum(batches.values())):
        names = [g for g, n in remaining.items() if n > 0]
        counts = np.array([remaining[g] for g in names], dtype=np.float64)
        group = names[rng.choice(len(names), p=counts / counts.sum())]
        remaining[group] -= 1
        order.append(group)
    return order


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
        rng = np.random.default_rng(seed_sequence(seed, epoch, rank, group_index))
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
