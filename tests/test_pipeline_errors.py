"""Broken shard folders end in one sentence naming the shard (and sample) and the fix, never a hang.

Damage that still parses (a flipped byte anywhere in a sample, or a sample that breaks the format
with a matching checksum) is found by the check both loaders run on every sample they read.
"""

import gc
import json
import shutil

import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg

from pipeline.loader import build_loader
from pipeline.shard_format import (
    ARRAY_COMPONENTS, CHECKSUM, FORMAT, ShardFormatError, ShardReadError, checksums, read_index, read_index_table,
)
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


@pytest.fixture(autouse=True)
def stop_failed_loaders():
    """Collect each test's failed loader (kept alive by the error's traceback) with its worker processes.

    Left to the garbage collector, dozens of them (DataLoader workers and their queue threads)
    pile up across this module; with them alive, the sharder's forked worker pool in a later
    test module was seen to hang.
    """
    yield
    gc.collect()


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


def rewrite_member(tar, component, change, fix_crc: bool, row: int = 1) -> str:
    """Replace one member of sample `row` in place by `change(bytes)` (same length); returns the sample's key.

    `fix_crc=False` is damage as a disk makes it; `fix_crc=True` also rewrites the sample's crc32
    member, as a writer that breaks the format would, so only the format checks can notice.
    """
    members = read_index(tar.with_suffix(".idx"))[row]
    with open(tar, "r+b") as f:
        data = {}
        for name, (offset, size) in members.members.items():
            f.seek(offset)
            data[name] = f.read(size)
        data[component] = changed = change(data[component])
        assert len(changed) == members.members[component][1]
        f.seek(members.members[component][0])
        f.write(changed)
        if fix_crc:
            f.seek(members.members[CHECKSUM][0])
            f.write(checksums(data))
    return members.key


def flip_byte(position: float):
    """A change that inverts the byte at `position` (a fraction of the member's length)."""
    def change(data: bytes) -> bytes:
        i = int(len(data) * position)
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    return change


def set_array(name: str, index: tuple, value):
    dtype, row = ARRAY_COMPONENTS[name]
    def change(data: bytes) -> bytes:
        array = np.frombuffer(data, dtype).reshape(-1, *row).copy()
        array[index] = value
        return array.tobytes()
    return change


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("component", "position"),
    [("jpg", 0.6), ("json", 0.5), ("boxes", 0.1), ("labels", 0.0), ("polys", 0.0), ("verts", 0.5), ("crc32", 0.0)],
)
def test_a_flipped_byte_in_any_member_stops_the_loader_naming_shard_and_sample(shards_copy, backend, component, position):
    tar = second_landscape_shard(shards_copy)
    key = rewrite_member(tar, component, flip_byte(position), fix_crc=False)
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    # A damaged crc32 member no longer matches the first component it covers.
    named = "jpg" if component == "crc32" else component
    assert_one_sentence(error.value, tar.name, f"sample {key}", f"the {named} member does not match its crc32",
                        "tools/shard_coco.py --verify")


def test_a_flipped_jpeg_byte_still_decodes_so_only_the_checksum_finds_it(shards_copy):
    """The case the checksum exists for: the damaged JPEG decodes to another image, without an error."""
    tar = second_landscape_shard(shards_copy)
    key = rewrite_member(tar, "jpg", flip_byte(0.6), fix_crc=False)
    members = read_index(tar.with_suffix(".idx"))[1].members
    with open(tar, "rb") as f:
        f.seek(members["jpg"][0])
        damaged = f.read(members["jpg"][1])
    image = decode_jpeg(torch.frombuffer(bytearray(damaged), dtype=torch.uint8))
    assert image.shape[0] == 3 and key


def _meta_with_id(image_id_change):
    def change(data: bytes) -> bytes:
        meta = json.loads(data)
        text = json.dumps({**meta, "image_id": image_id_change(meta["image_id"])}, sort_keys=True).encode()
        return text.ljust(len(data))  # JSON allows trailing spaces
    return change


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("component", "change", "message"),
    [
        ("labels", set_array("labels", (0,), 252), "label 252 is outside 1..8"),
        ("labels", set_array("labels", (0,), 0), "label 0 is outside 1..8"),
        ("boxes", set_array("boxes", (0, 2), np.nan), "a box coordinate is not finite"),
        ("boxes", set_array("boxes", (0, 2), 1e6), "is empty or outside the"),
        ("boxes", set_array("boxes", (0, 0), -3.0), "is empty or outside the"),
        ("verts", set_array("verts", (0, 1), np.inf), "a polygon vertex is not finite"),
        ("polys", set_array("polys", (0, 2), 10**6), "the polys rows do not index"),
        ("polys", set_array("polys", (0, 0), 7), "the polys rows do not index"),
        ("json", lambda data: b"\xff" + data[1:], "the json member does not decode"),
        ("json", _meta_with_id(lambda i: i + 1), "not the sample's key"),
        ("json", lambda data: b"[]".ljust(len(data)), "the json member is not an object"),
    ],
)
def test_a_sample_that_breaks_the_format_stops_the_loader_saying_what_is_wrong(
    shards_copy, backend, component, change, message
):
    tar = second_landscape_shard(shards_copy)
    key = rewrite_member(tar, component, change, fix_crc=True)
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    assert_one_sentence(error.value, tar.name, f"sample {key}", message, "tools/shard_coco.py --verify")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg_that_does_not_decode_names_shard_and_sample(shards_copy, backend):
    tar = second_landscape_shard(shards_copy)
    key = rewrite_member(tar, "jpg", lambda data: b"\0" * 64 + data[64:], fix_crc=True)  # the checksum agrees
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    assert_one_sentence(error.value, tar.name, f"sample {key}", "does not decode", "tools/shard_coco.py --verify")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_folder_of_the_previous_format_asks_for_a_re_shard(shards_copy, backend):
    manifest_path = shards_copy / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "format": "coco-wds/1"}))
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    assert_one_sentence(error.value, "manifest.json", "'coco-wds/1'", FORMAT, "re-shard with tools/shard_coco.py")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_beyond_the_manifest_maxima_is_an_error_not_a_truncation(shards_copy, backend):
    manifest_path = shards_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["max_instances"] = manifest["max_polygons"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardReadError) as error:
        load_all(shards_copy, backend)
    assert_one_sentence(error.value, "max", "tools/shard_coco.py")


def test_the_index_table_holds_what_the_index_says_and_other_layouts_take_the_line_parser(shards_copy):
    for index in sorted(shards_copy.glob("*.idx")):
        rows, table = read_index(index), read_index_table(index)
        assert table.keys.tolist() == [row.key for row in rows]
        assert [table.members(i) for i in range(len(table))] == [row.members for row in rows]
    # A valid index in another layout (members in another order) and a damaged one: the line parser decides.
    index = sorted(shards_copy.glob("*.idx"))[0]
    header, first, *rest = index.read_text().splitlines()
    quads = first.split()
    reordered = " ".join(" ".join(quads[i : i + 4]) for i in reversed(range(0, len(quads), 4)))
    index.write_text("\n".join([header, reordered, *rest]) + "\n")
    assert read_index_table(index).members(0) == read_index(index)[0].members
    index.write_text("\n".join([header, first.replace(quads[1], quads[1] + "x", 1), *rest]) + "\n")
    with pytest.raises(ShardFormatError, match="line 2 is not a valid index line"):
        read_index_table(index)
