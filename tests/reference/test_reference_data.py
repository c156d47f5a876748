"""Ground truth beside the MLPerf reference's own data code: its COCODataset, Resize and RandomHorizontalFlip.

The same COCO-format set (the synthetic one, with real JPEGs, plus the annotations that find
differences: boxes past the border, at most 1 pixel wide, 1.5 pixels wide, wholly outside, an
instance whose only polygon has 2 points) goes through the reference's dataset and transforms
on one side, and through our sharder, shard reader and `make_batch` on the other. The images
kept, and per image the boxes, labels and polygons after resize and flip, must be the same.
The one difference by design: polygons of fewer than 3 points, which pycocotools cannot
rasterize as polygons, are not stored (their instance is, with its box: the reference keeps it).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.batch import make_batch, resized_size, sample_record, transform_image
from pipeline.dali_pipeline import detection_pipeline
from pipeline.synthetic_coco import make_synthetic_coco
from pipeline.shard_format import open_shard_set, orientation, read_manifest, read_sample, sample_refs
from pipeline.sharding import shard_coco
from reference_oracle import reference, requires_reference

pytestmark = [requires_reference, pytest.mark.filterwarnings("ignore::UserWarning")]

MIN_SIZE, MAX_SIZE = 96, 160
ONE = torch.tensor([0.0, 0.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def odd_set(synthetic_coco, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(images, annotations, shards): the synthetic train split with the odd annotations added, sharded."""
    data = json.loads(synthetic_coco.train_json.read_text())
    images = sorted(data["images"], key=lambda i: i["id"])
    category = data["categories"][0]["id"]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for image, (bbox, segmentation) in zip(images, [
        ([-6.0, -4.0, 30.0, 20.0], [[-6, -4, 24, -4, 24, 16, -6, 16]]),  # past the top-left corner
        ("right", None),  # past the right and bottom edges
        ([20.0, 20.0, 1.0, 9.0], [[20, 20, 21, 20, 21, 29]]),  # 1 pixel wide: dropped
        ([30.0, 20.0, 0.5, 9.0], [[30, 20, 30.5, 20, 30.5, 29]]),  # under a pixel: dropped
        ([40.0, 20.0, 1.5, 9.0], [[40, 20, 41.5, 20, 41.5, 29]]),  # 1.5 pixels: kept
        ("outside", None),  # wholly outside the image: dropped
        ([10.0, 10.0, 6.0, 6.0], [[10, 10, 16, 16]]),  # its only polygon has 2 points: kept for its box
        ([12.0, 14.0, 25.0, 18.0], [[12, 14, 37, 14, 37, 32], [20, 14, 30, 14, 30, 20, 20, 20]]),  # overlapping parts
    ]):
        w, h = image["width"], image["height"]
        if bbox == "right":
            bbox, segmentation = [w - 12.0, h - 9.0, 20.0, 15.0], [[w - 12, h - 9, w + 8, h - 9, w + 8, h + 6]]
        elif bbox == "outside":
            bbox, segmentation = [w + 3.0, 5.0, 10.0, 10.0], [[w + 3, 5, w + 13, 5, w + 13, 15]]
        data["annotations"].append({"id": next_id, "image_id": image["id"], "category_id": category, "bbox": bbox,
                                    "segmentation": segmentation, "area": 1.0, "iscrowd": 0})
        next_id += 1
    root = tmp_path_factory.mktemp("reference_data")
    annotations = root / "instances_odd.json"
    annotations.write_text(json.dumps(data))
    shards = root / "shards"
    shard_coco(synthetic_coco.train_images, annotations, shards, mode="train", samples_per_shard=100)
    return synthetic_coco.train_images, annotations, shards


def reference_ground_truth(images: Path, annotations: Path, flip: bool) -> dict:
    """image id -> the reference's target (BoxList with labels and masks) after Resize and the flip."""
    dataset = reference("data.datasets.coco").COCODataset(str(annotations), str(images), remove_images_without_annotations=True)
    transforms = reference("data.transforms.transforms")
    pipeline = transforms.Compose([transforms.Resize(MIN_SIZE, MAX_SIZE), transforms.RandomHorizontalFlip(1.0 if flip else 0.0)])
    targets = {}
    for index in range(len(dataset)):
        image, target, _ = dataset[index]
        _, targets[dataset.id_to_img_map[index]] = pipeline(image, target)
    return targets


def our_ground_truth(shards: Path, flip: bool) -> dict:
    """image id -> our Batch of that one sample, made as both loaders make it."""
    manifest = read_manifest(shards)
    maxima = tuple(max(1, manifest[k]) for k in ("max_instances", "max_polygons", "max_vertices"))
    batches = {}
    for refs in sample_refs(open_shard_set(shards)).values():
        for ref in refs:
            record = sample_record(read_sample(ref), ref.tar, flip, MIN_SIZE, MAX_SIZE)
            image = torch.zeros(*record.resized, 3, dtype=torch.uint8)
            batches[record.image_id] = make_batch(
                [record], [image], maxima=maxima, bucket=None, size_divisibility=32, device=torch.device("cpu")
            )
    return batches


@pytest.mark.parametrize("flip", [False, True], ids=["unflipped", "flipped"])
def test_ground_truth_equals_the_reference_datasets(odd_set, flip):
    images, annotations, shards = odd_set
    theirs = reference_ground_truth(images, annotations, flip)
    ours = our_ground_truth(shards, flip)
    assert ours.keys() == theirs.keys()  # the image filter (has_valid_annotation)
    compared_parts = 0
    for image_id, target in theirs.items():
        batch = ours[image_id]
        n = int(batch.num_boxes[0])
        assert n == len(target), image_id  # the instance rules (crowd, clip_to_image(remove_empty=True))
        assert tuple(batch.image_sizes[0].tolist()) == (target.size[1], target.size[0])
        assert torch.equal(batch.labels[0, :n], target.get_field("labels"))
        torch.testing.assert_close(batch.boxes[0, :n] - ONE, target.bbox, rtol=1e-6, atol=1e-4)
        polys = batch.polys[0, : int(batch.num_polys[0])].tolist()
        for instance, polygons in enumerate(target.get_field("masks")):
            expected = [p for p in polygons.polygons if len(p) >= 6]
            mine = [batch.verts[0, first:end].flatten() for owner, first, end in polys if owner == instance]
            assert len(mine) == len(expected), (image_id, instance)
            for got, want in zip(mine, expected):
                assert torch.equal(got, want), (image_id, instance)
            compared_parts += len(mine)
    assert compared_parts > 20


def test_images_are_grouped_by_orientation_as_the_reference_groups_them():
    """The reference's aspect-ratio grouping (data/build.py, ASPECT_RATIO_GROUPING): group
    bisect_right([1], h / w), so squares go with the portraits. (Its module imports torch._six,
    which today's torch lacks, so its rule is restated here.)"""
    for h, w in [(480, 640), (640, 480), (500, 500), (799, 800), (801, 800)]:
        assert orientation(h, w) == ("portrait" if bisect.bisect_right([1], h / w) else "landscape")


def test_resized_pixels_are_the_references_within_decoder_and_kernel_differences(tmp_path):
    """The reference decodes with PIL and resizes the PIL image (its Resize: torchvision's F.resize, PIL's
    bilinear); ours decode with torchvision (the torch fallback) or DALI and resize with antialiased
    bilinear kernels. Measured on photograph-like JPEGs of about 480x640 resized to about 800x1066: the torch
    fallback's mean absolute difference is about 0.001 of 255, DALI's (CPU) about 0.19."""
    make_synthetic_coco(tmp_path, "val", 4, seed=3, image_size=(480, 640))
    paths = sorted((tmp_path / "val2017").glob("*.jpg"))
    resize = reference("data.transforms.transforms").Resize(800, 1333)
    theirs, sizes = [], []
    for path in paths:
        image = Image.open(path).convert("RGB")
        empty = reference("structures.bounding_box").BoxList(torch.zeros(0, 4), image.size)
        theirs.append(np.asarray(resize(image, empty)[0], dtype=np.int16))
        sizes.append(resized_size(image.height, image.width, 800, 1333))
        assert theirs[-1].shape[:2] == sizes[-1]
    torch_fallback = [
        transform_image(decode_jpeg(torch.from_numpy(np.fromfile(p, np.uint8)), mode=ImageReadMode.RGB), size, False)
        for p, size in zip(paths, sizes)
    ]
    pipe = detection_pipeline(
        source=lambda: ([np.fromfile(p, np.uint8) for p in paths], [np.float32([0, 0, 1, 1])] * len(paths),
                        [np.float32(size) for size in sizes]),
        decode_on_gpu=False, output_on_gpu=False, batch_size=len(paths), num_threads=1, device_id=None,
    )  # fmt: skip
    pipe.build()
    (dali,) = pipe.run()
    torch_difference = np.mean([np.abs(o.numpy().astype(np.int16) - t).mean() for o, t in zip(torch_fallback, theirs)])
    dali_difference = np.mean([np.abs(np.array(dali[i]).astype(np.int16) - t).mean() for i, t in enumerate(theirs)])
    assert torch_difference < 0.01 and dali_difference < 0.5, (torch_difference, dali_difference)
