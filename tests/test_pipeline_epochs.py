"""Epoch semantics on the shared synthetic shards: ranks, evaluation coverage, determinism, resume."""

import json

import pytest
import torch
import webdataset

from pipeline.batch import Batch
from pipeline.loader import build_loader
from pipeline_shards import data_config, write_drawn_shards

BACKENDS = ["dali", "torch"]


def all_image_ids(folder) -> set[int]:
    """Every image id in a shard folder, from the tars themselves (the webdataset library)."""
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    return {json.loads(sample["json"])["image_id"] for sample in webdataset.WebDataset(tars, shardshuffle=False)}


def loader(folder, backend, *, training, rank=0, world_size=1, seed=3, batch_size=2, overrides=()):
    return build_loader(
        data_config(*overrides), folder, training=training, batch_size=batch_size,
        rank=rank, world_size=world_size, seed=seed, backend=backend,
    )


def ids_of(batches: list[Batch]) -> list[int]:
    return [i for b in batches for i in b.image_ids.tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_two_ranks_read_disjoint_samples_that_cover_the_epoch(train_shards, backend, training):
    expected = all_image_ids(train_shards)
    per_rank = []
    for rank in range(2):
        rank_loader = loader(train_shards, backend, training=training, rank=rank, world_size=2)
        batches = list(rank_loader)
        assert len(batches) == len(rank_loader)
        per_rank.append(set(ids_of(batches)))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_yields_every_image_once_in_shard_order_padding_repeats_ids(val_shards, backend):
    eval_loader = loader(val_shards, backend, training=False, batch_size=5)
    ids = ids_of(list(eval_loader))
    expected = all_image_ids(val_shards)
    assert set(ids) == expected
    assert len(ids) == 5 * len(eval_loader)
    # Padding entries repeat an id already yielded; deduplicating by id leaves each image once.
    assert len(dict.fromkeys(ids)) == len(expected)
    assert all(not b.flipped.any() for b in eval_loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_are_deterministic_for_a_seed_and_differ_between_epochs(train_shards, backend):
    first = loader(train_shards, backend, training=True)
    second = loader(train_shards, backend, training=True)
    second.set_epoch(1)
    epoch1 = ids_of(list(second))
    first.set_epoch(1)
    assert ids_of(list(first)) == epoch1
    first.set_epoch(0)
    assert ids_of(list(first)) != epoch1


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in vars(x):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_k_batches_yields_the_rest_of_the_epoch(train_shards, backend):
    overrides = ("data.flip_prob=0.5",)
    reference = loader(train_shards, backend, training=True, overrides=overrides)
    reference.set_epoch(2)
    uninterrupted = list(reference)
    k = 3
    interrupted = loader(train_shards, backend, training=True, overrides=overrides)
    interrupted.set_epoch(2)
    batches = iter(interrupted)
    for _ in range(k):
        next(batches)
    state = interrupted.state_dict()
    resumed = loader(train_shards, backend, training=True, overrides=overrides)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # a checkpoint taken before iterating keeps the resume point
    resumed.set_epoch(2)  # the trainer's usual call keeps the resume point of the same epoch
    assert_same_batches(list(resumed), uninterrupted[k:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_uneven_ranks_yield_equal_batch_counts_and_cover_the_set(tmp_path, backend):
    # 7 landscape and 4 portrait images over 3 ranks: ranges of 2-3 samples, padded to equal batches.
    samples = write_drawn_shards(tmp_path, [(64, 96)] * 7 + [(96, 64)] * 4, samples_per_shard=2)
    seen = []
    for rank in range(3):
        rank_loader = loader(tmp_path, backend, training=False, rank=rank, world_size=3)
        batches = list(rank_loader)
        assert len(batches) == len(rank_loader) == 2 + 1  # ceil(3 / 2) landscape + ceil(2 / 2) portrait
        seen.append(set(ids_of(batches)))
    assert sum(len(s) for s in seen) == len(samples)
    assert set().union(*seen) == {s.image_id for s in samples}


def test_seeds_come_from_seed_sequences_so_seed_and_rank_never_trade_places():
    from pipeline.epoch_plan import derived_seed
    from train.distributed import rank_seed

    assert rank_seed(5, 0) == 5  # a single process is seeded by the run's seed itself
    assert rank_seed(1, 0) != rank_seed(0, 1)  # seed + rank made these equal
    assert len({rank_seed(seed, rank) for seed in range(8) for rank in range(8)}) == 64
    assert derived_seed(3, 1) == derived_seed(3, 1) != derived_seed(1, 3)
