"""Broken shard folders end in one sentence naming the shard (and sample) and the fix, never a hang."""

import json
import shutil

import pytest

from pipeline.loader import build_loader
from pipeline.shard_format import read_index, sample_key
from pipeline.shard_set import ShardReadError
from pipeline_shards import data_config

BACKENDS = ["dali", "torch"]
pytestmark = pytest.mark.timeout(120)


def load_all(folder, backend):
    return list(build_loader(data_config(), folder, training=True, batch_size=2, backend=backend))


def assert_one_sentence(error: ShardReadError, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


@pytest.fixture
def shards_copy(train_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(train_shards, folder)
    return folder


def second_landscape_shard(folder):
    return sorted(folder.glob("*-landscape-*.tar"))[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_folder(tmp_path, backend):
    with pytest.raises(ShardReadError) as error:
        load_all(tmp_path / "nowhere", backend)
    assert_one_sentence(error.value, "nowhere", "tools/shard_coco.py")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_folder(tmp_path, backend):
    with pytest.raises(ShardReadError) as error:
        load_all(tmp_path, backend)
    assert_one_sentence(error.value, str(tmp_path), "manifest.json", "tools/shard_coco.py")


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_that_does_not_match_its_tar(shards_copy, backend):
    tar = second_landscape_shard(shards_copy)
    other = sorted(shards_copy.glob("*-portrait-*.idx"))[0]
    shutil.copy(other, tar.with_suffix(".idx"))
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    assert_one_sentence(error.value, tar.with_suffix(".idx").name, "tools/shard_coco.py --verify")


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_tar(shards_copy, backend):
    tar = second_landscape_shard(shards_copy)
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    assert_one_sentence(error.value, tar.name, "truncated", "tools/shard_coco.py --verify")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg_that_does_not_decode_names_shard_and_sample(shards_copy, backend):
    tar = second_landscape_shard(shards_copy)
    members = read_index(tar.with_suffix(".idx"))[1]
    offset, _ = members["jpg"]
    with open(tar, "r+b") as f:  # same size, so only decoding can notice
        f.seek(offset)
        f.write(b"\0" * 64)
    with open(tar, "rb") as f:
        f.seek(members["json"][0])
        key = sample_key(json.loads(f.read(members["json"][1]))["image_id"])
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    assert_one_sentence(error.value, tar.name, f"sample {key}", "does not decode", "tools/shard_coco.py --verify")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_beyond_the_manifest_maxima_is_an_error_not_a_truncation(shards_copy, backend):
    manifest_path = shards_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["max_instances"] = manifest["max_polygons"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    assert_one_sentence(error.value, "max", "tools/shard_coco.py")
