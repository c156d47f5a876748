"""Per-batch ground-truth padding and the host-side batch both backends build, against hand-worked cases."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.batch import SampleRecord, make_batch, padded_count
from pipeline.loader import build_loader
from pipeline.shard_format import ShardReadError, shard_name, write_manifest, write_shard
from pipeline_shards import DRAWN_CATEGORIES, data_config, write_drawn_shards

CPU = torch.device("cpu")


def record(image_id, boxes, *, flipped=False, original=(10, 20), resized=(20, 40), polys=None, verts=None):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    if verts is None:  # one rectangle polygon per box
        verts = np.array([[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]]] for b in boxes], np.float32).reshape(-1, 2)
        polys = np.array([(i, 3 * i, 3 * i + 3) for i in range(len(boxes))], np.int32).reshape(-1, 3)
    return SampleRecord(
        image_id=image_id, original=original, resized=resized, flipped=flipped, boxes=boxes,
        labels=np.arange(1, len(boxes) + 1, dtype=np.int32), polys=polys, verts=verts, source=(Path("s.tar"), "key"),
    )


def test_slots_are_powers_of_two_from_16_capped_at_the_manifest_maximum():
    assert [padded_count(n, 93) for n in (0, 1, 16, 17, 32, 33, 64, 65, 93)] == [16, 16, 16, 32, 32, 64, 64, 93, 93]
    assert padded_count(2, 3) == 3  # a set whose maximum is below 16 pads to its maximum
    # On COCO (at most 93 instances) a batch takes one of four shapes.
    assert {padded_count(n, 93) for n in range(94)} == {16, 32, 64, 93}


def test_batch_is_padded_to_its_fullest_image_and_scaled_and_flipped_per_image():
    records = [
        record(1, [[2, 1, 6, 5]] * 20, flipped=True),  # 20 boxes: 32 slots for the batch
        record(2, [[0, 0, 10, 10]], original=(10, 10), resized=(30, 30)),
    ]
    images = [torch.full((20, 40, 3), 7, dtype=torch.uint8), torch.full((30, 30, 3), 9, dtype=torch.uint8)]
    batch = make_batch(records, images, maxima=(93, 100, 500), bucket=None, size_divisibility=32, device=CPU)
    assert batch.boxes.shape == (2, 32, 4) and batch.labels.shape == (2, 32)
    assert batch.num_boxes.tolist() == [20, 1]
    # Image 1: scale (sx, sy) = (2, 2) as the reference scales its inclusive boxes (x2 - 1 scaled, + 1),
    # then boxes x -> 40 - x (mirrored), vertices x -> 40 - x - 1 (the reference's); image 2: scale 3.
    assert batch.boxes[0, 0].tolist() == [40 - 11, 2, 40 - 4, 9]
    assert batch.boxes[1, 0].tolist() == [0, 0, 28, 28]
    assert not batch.boxes[1, 1:].any() and not batch.boxes[0, 20:].any()  # padding stays zero after the flip
    assert batch.verts[0, 0].tolist() == [40 - 4 - 1, 2] and not batch.verts[1, 3:].any()
    assert batch.polys[1, 0].tolist() == [0, 0, 3] and batch.polys[1, 1].tolist() == [-1, 0, 0]
    assert batch.labels.dtype == torch.int64 and batch.polys.dtype == torch.int32
    assert batch.scales.tolist() == [[2.0, 2.0], [3.0, 3.0]]
    assert batch.images.shape == (2, 3, 32, 64) and batch.images.is_contiguous(memory_format=torch.channels_last)
    assert int(batch.images[0, :, :20, :40].min()) == 7 and not batch.images[0, :, 20:].any()
    assert not batch.images[1, :, :, 30:].any()


def test_a_sample_past_the_maxima_is_an_error_naming_the_sample():
    with pytest.raises(ShardReadError, match=r"s.tar \(sample key\).*max_instances"):
        make_batch([record(1, [[0, 0, 1, 1]] * 3)], [torch.zeros(20, 40, 3, dtype=torch.uint8)],
                   maxima=(2, 10, 10), bucket=None, size_divisibility=1, device=CPU)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loaders_pad_each_batch_to_its_own_count(tmp_path, backend):
    # Six drawn images with 1-3 instances; the first gets 20 boxes, so only its batch needs more than 16 slots.
    samples = write_drawn_shards(tmp_path / "drawn", [(60, 80)] * 6, samples_per_shard=6)
    # Each of the 20 instances keeps a polygon of its own.
    first = samples[0].verts[samples[0].polys[0, 1] : samples[0].polys[0, 2]]
    crowded = dataclasses.replace(
        samples[0], boxes=np.tile(samples[0].boxes[:1], (20, 1)), labels=np.ones(20, np.int32),
        polys=np.array([(i, i * len(first), (i + 1) * len(first)) for i in range(20)], np.int32),
        verts=np.tile(first, (20, 1)),
    )
    stored = [crowded, *samples[1:]]
    entry = write_shard(tmp_path / shard_name("train", "landscape", 0), stored)
    maxima = {"max_instances": 20, "max_polygons": max(len(s.polys) for s in stored),
              "max_vertices": max(len(s.verts) for s in stored)}
    write_manifest(tmp_path, {"split": "train", "shards": [entry], "samples": 6, "categories": DRAWN_CATEGORIES, **maxima})
    loader = build_loader(data_config("data.flip_prob=0.0"), tmp_path, training=False, batch_size=3, backend=backend)
    slots = {crowded.image_id in b.image_ids.tolist(): b.boxes.shape[1] for b in loader}
    assert slots == {True: 20, False: 16}  # 20: the manifest's maximum caps the next power of two
