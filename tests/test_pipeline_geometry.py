"""Flip, resize and padding, checked against independent computations (pycocotools, torchvision)."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from torchvision.io import decode_jpeg

from pipeline.batch import Batch, bucket_shapes, resized_size
from pipeline.loader import build_loader
from pipeline.shard_format import orientation
from pipeline_shards import data_config, write_drawn_shards

BACKENDS = ["dali", "torch"]
SIZES = [(96, 128), (128, 96), (90, 150), (120, 100), (64, 64), (100, 180), (150, 90)]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drawn")
    samples = write_drawn_shards(folder, SIZES, samples_per_shard=2)
    return folder, {s.image_id: s for s in samples}


def load_epoch(folder, backend, *overrides, training=True, batch_size=2):
    loader = build_loader(data_config(*overrides), folder, training=training, batch_size=batch_size, backend=backend)
    return list(loader)


def per_image(batches: list[Batch]):
    """(batch, index) of every image id's first appearance."""
    seen = {}
    for batch in batches:
        for i, image_id in enumerate(batch.image_ids.tolist()):
            seen.setdefault(image_id, (batch, i))
    return seen


def polygon_mask(batch: Batch, i: int, flip_back: bool = False) -> np.ndarray:
    h, w = batch.image_sizes[i].tolist()
    verts = batch.verts[i].clone()
    if flip_back:
        verts[:, 0] = w - verts[:, 0] - 1
    polygons = [verts[first:end].flatten().tolist() for _, first, end in batch.polys[i][: batch.num_polys[i]].tolist()]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)


def object_pixels(batch: Batch, i: int) -> np.ndarray:
    h, w = batch.image_sizes[i].tolist()
    return (batch.images[i, :, :h, :w].float().mean(0) > 128).numpy()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_polygons_cover_the_flipped_objects(drawn, backend):
    folder, samples = drawn
    images = per_image(load_epoch(folder, backend, "data.flip_prob=1.0"))
    assert set(images) == set(samples)
    for image_id, (batch, i) in images.items():
        assert bool(batch.flipped[i])
        # The reference flips vertices to W - x - 1: its polygons sit one pixel left of the flipped pixels.
        objects = np.zeros_like(object_pixels(batch, i))
        objects[:, :-1] = object_pixels(batch, i)[:, 1:]
        assert iou(polygon_mask(batch, i), objects) > 0.8, image_id
        # The test can tell: the same polygons left unflipped miss the objects.
        assert iou(polygon_mask(batch, i, flip_back=True), objects) < 0.3, image_id


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_boxes_sit_where_the_reference_puts_them_beside_their_polygons(drawn, backend):
    """The drawn boxes are their polygons' extents; scaled and flipped as the reference does, the box
    moves by (sx, 0, 1, 1 - sy) from the transformed polygons' extent: its inclusive-box scaling
    ((x2 - 1) s + 1) and its flips (boxes mirrored, vertices to W - x - 1)."""
    folder, _ = drawn
    for batch in load_epoch(folder, backend, "data.flip_prob=1.0"):
        for i in range(len(batch)):
            verts, polys = batch.verts[i], batch.polys[i][: batch.num_polys[i]]
            sy, sx = batch.scales[i].tolist()
            for k, box in enumerate(batch.boxes[i][: batch.num_boxes[i]]):
                points = torch.cat([verts[first:end] for inst, first, end in polys.tolist() if inst == k])
                extent = torch.cat([points.min(0).values, points.max(0).values])
                assert torch.allclose(box, extent + torch.tensor([sx, 0.0, 1.0, 1.0 - sy]), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes_and_vertices_scale_exactly_with_the_image(drawn, backend):
    folder, samples = drawn
    for image_id, (batch, i) in per_image(load_epoch(folder, backend, "data.flip_prob=0.0")).items():
        source = samples[image_id]
        assert batch.original_sizes[i].tolist() == [source.height, source.width]
        assert tuple(batch.image_sizes[i].tolist()) == resized_size(source.height, source.width, 96, 160)
        sy, sx = batch.scales[i].tolist()
        assert sy == pytest.approx(batch.image_sizes[i, 0].item() / source.height)
        assert sx == pytest.approx(batch.image_sizes[i, 1].item() / source.width)
        n, v = len(source.boxes), len(source.verts)
        assert int(batch.num_boxes[i]) == n and int(batch.num_polys[i]) == len(source.polys)
        inclusive = torch.from_numpy(source.boxes) - torch.tensor([0.0, 0.0, 1.0, 1.0])  # scaled as the reference's boxes
        expected = inclusive * torch.tensor([sx, sy, sx, sy]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        assert torch.allclose(batch.boxes[i, :n], expected, rtol=1e-5)
        assert torch.allclose(batch.verts[i, :v], torch.from_numpy(source.verts) * torch.tensor([sx, sy]), rtol=1e-5)
        assert batch.polys[i, : len(source.polys)].tolist() == source.polys.tolist()
        assert batch.labels[i, :n].tolist() == source.labels.tolist()
        # Ground-truth padding is zero (polygons: (-1, 0, 0)).
        assert not batch.boxes[i, n:].any() and not batch.labels[i, n:].any() and not batch.verts[i, v:].any()
        assert (batch.polys[i, len(source.polys) :] == torch.tensor([-1, 0, 0], dtype=torch.int32)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("static_shapes", [True, False])
def test_padding_never_moves_content(drawn, backend, static_shapes):
    folder, samples = drawn
    batches = load_epoch(folder, backend, "data.flip_prob=0.0", f"data.static_shapes={str(static_shapes).lower()}")
    for image_id, (batch, i) in per_image(batches).items():
        h, w = batch.image_sizes[i].tolist()
        # Independent reference: torchvision decode + antialiased bilinear resize, uint8 RGB.
        rgb = decode_jpeg(torch.frombuffer(bytearray(samples[image_id].jpeg), dtype=torch.uint8))
        expected = torch.nn.functional.interpolate(rgb[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
        assert batch.images.dtype == torch.uint8
        assert (batch.images[i, :, :h, :w].float() - expected.round()).abs().mean() < 3.0, image_id
        assert not batch.images[i, :, h:, :].any() and not batch.images[i, :, :, w:].any()
        assert batch.images.shape[-2] % 32 == 0 and batch.images.shape[-1] % 32 == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_orientation_homogeneous_and_bucket_shaped(drawn, backend):
    folder, _ = drawn
    buckets = bucket_shapes(96, 160, 32, [[800, 1344], [1344, 800]])
    assert buckets == {"landscape": (96, 160), "portrait": (160, 96)}
    batches = load_epoch(folder, backend, "data.flip_prob=0.5")
    groups_seen = set()
    for batch in batches:
        groups = {orientation(h, w) for h, w in batch.original_sizes.tolist()}
        assert len(groups) == 1
        group = groups.pop()
        groups_seen.add(group)
        assert tuple(batch.images.shape) == (len(batch), 3, *buckets[group])
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert groups_seen == {"landscape", "portrait"}
