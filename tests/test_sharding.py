"""The sharder against independent readers (webdataset, DALI) and a direct reading of the JSON.

Expected ground truth is computed here from the source JSON with pycocotools, following the
rules as the issue states them, not with the sharder's own helpers.
"""

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from pycocotools.coco import COCO

from pipeline.shard_format import read_manifest
from pipeline.sharding import shard_coco, verify_shards

REPO = Path(__file__).parents[1]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shard_tool = _load_tool("shard_coco")


def _run_tool(*argv: str) -> None:
    assert shard_tool.main(shard_tool.get_args_parser().parse_args([str(a) for a in argv])) == 0


# ----------------------------------------------------------------------------- expected values


def finite_bbox(ann: dict) -> bool:
    return bool(np.isfinite(ann["bbox"]).all())


def finite_polygon(polygon: list) -> bool:
    """Finite once stored as float32 (1e39 is not)."""
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.asarray(polygon, np.float32)).all())


def reference_kept_image_ids(coco: COCO) -> set[int]:
    """The reference filter, straight from its description: >= 1 annotation, not all boxes <= 1 px.

    Annotations with a non-finite bbox count as absent (our rule; COCO has none).
    """
    kept = set()
    for image_id in coco.getImgIds():
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)) if finite_bbox(a)]
        if anns and not all(any(side <= 1 for side in a["bbox"][2:]) for a in anns):
            kept.add(image_id)
    return kept


def expected_instances(coco: COCO, image_id: int) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """(xyxy boxes clipped, contiguous labels, polygons per instance) after the documented rules."""
    image = coco.imgs[image_id]
    contiguous = {cid: i for i, cid in enumerate(sorted(coco.getCatIds()), start=1)}
    boxes, labels, polygons = [], [], []
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
        if not finite_bbox(ann):
            continue
        x, y, w, h = ann["bbox"]
        size = np.array([image["width"], image["height"]])
        # The reference's float32 inclusive box, clamped to [0, size - 1], kept when x2 > x1 and y2 > y1.
        low = np.float32([x, y])
        high = low + np.maximum(np.float32([w, h]) - np.float32(1), 0)
        keep = (np.clip(high, 0, size - 1) > np.clip(low, 0, size - 1)).all()
        box = np.clip([x, y, x + w, y + h], 0, [*size, *size])
        parts = [np.reshape(p, (-1, 2)) for p in ann["segmentation"] if len(p) >= 6 and finite_polygon(p)]
        if keep:  # an instance without a usable polygon is kept for its box, as the reference keeps it
            boxes.append(box)
            labels.append(contiguous[ann["category_id"]])
            polygons.append(parts)
    return np.reshape(boxes, (-1, 4)), np.asarray(labels), polygons


def stored_polygons(polys: np.ndarray, verts: np.ndarray, num_instances: int) -> list[list[np.ndarray]]:
    per_instance = [[] for _ in range(num_instances)]
    for instance, first, end in polys:
        per_instance[instance].append(verts[first:end])
    return per_instance


def assert_sample_matches_json(coco: COCO, meta: dict, boxes, labels, polys, verts) -> None:
    image = coco.imgs[meta["image_id"]]
    assert (meta["file_name"], meta["height"], meta["width"]) == (image["file_name"], image["height"], image["width"])
    want_boxes, want_labels, want_polygons = expected_instances(coco, meta["image_id"])
    np.testing.assert_allclose(boxes, want_boxes, rtol=1e-6)
    np.testing.assert_array_equal(labels, want_labels)
    got_polygons = stored_polygons(polys, verts, len(labels))
    assert [len(p) for p in got_polygons] == [len(p) for p in want_polygons]
    for got, want in zip(got_polygons, want_polygons):
        for got_part, want_part in zip(got, want):
            np.testing.assert_allclose(got_part, want_part, rtol=1e-6)


def read_with_webdataset(shard_dir_or_tar: Path) -> list[dict]:
    tars = [shard_dir_or_tar] if shard_dir_or_tar.is_file() else sorted(shard_dir_or_tar.glob("*.tar"))
    return list(wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False))


def check_round_trip_with_webdataset(shard_dir: Path, annotations: Path) -> set[int]:
    coco = COCO(str(annotations))
    ids = set()
    for sample in read_with_webdataset(shard_dir):
        meta = json.loads(sample["json"])
        assert sample["__key__"] == f"{meta['image_id']:012d}"
        arrays = {
            "boxes": np.frombuffer(sample["boxes"], "<f4").reshape(-1, 4),
            "labels": np.frombuffer(sample["labels"], "<i4"),
            "polys": np.frombuffer(sample["polys"], "<i4").reshape(-1, 3),
            "verts": np.frombuffer(sample["verts"], "<f4").reshape(-1, 2),
        }
        assert_sample_matches_json(coco, meta, **arrays)
        assert Image.open(io.BytesIO(sample["jpg"])).size == (meta["width"], meta["height"])
        ids.add(meta["image_id"])
    return ids


# ----------------------------------------------------------------------------- an input with every odd case


@pytest.fixture(scope="module")
def odd_coco(synthetic_coco, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """The synthetic train split plus the oddities real data has; returns (images, json, left-out files)."""
    root = tmp_path_factory.mktemp("odd_coco")
    images = root / "images"
    shutil.copytree(synthetic_coco.train_images, images)
    data = json.loads(synthetic_coco.train_json.read_text())
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    with_objects = [i for i in data["images"] if any(not a["iscrowd"] for a in by_image.get(i["id"], []))]

    # Files that must be left out: garbage bytes, a truncated JPEG, a missing file.
    corrupt, truncated, missing = (i["file_name"] for i in with_objects[:3])
    (images / corrupt).write_bytes(b"this is not a JPEG" * 100)
    jpeg = (images / truncated).read_bytes()
    (images / truncated).write_bytes(jpeg[: len(jpeg) // 2])
    (images / missing).unlink()
    # A PNG under a .jpg name decodes, so it is kept and re-encoded.
    png_image = with_objects[3]
    Image.open(images / png_image["file_name"]).save(images / png_image["file_name"], format="PNG")

    # Annotation oddities on one image: a box past the border, a part with 2 points, a box
    # of zero width after clipping, an instance whose only polygon has 2 points, boxes 1 and 1.5 wide.
    target = with_objects[4]
    h, w = target["height"], target["width"]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    category = data["categories"][0]["id"]

    def add(bbox, segmentation, image_id=target["id"]):
        nonlocal next_id
        data["annotations"].append({"id": next_id, "image_id": image_id, "category_id": category, "bbox": bbox,
                                    "segmentation": segmentation, "area": 1.0, "iscrowd": 0})
        next_id += 1

    add([w - 10, h - 10, 30, 30], [[w - 10, h - 10, w + 20, h - 10, w + 20, h + 20], [w - 5, h - 5, w - 4, h - 4]])
    add([w + 5, 10, 10, 10], [[w + 5, 10, w + 15, 10, w + 15, 20]])
    add([10, 10, 5, 5], [[10, 10, 15, 15]])
    # At most 1 pixel wide: the reference drops the box (its inclusive x2 = x1); 1.5 wide it keeps.
    add([20, 20, 1.0, 8], [[20, 20, 21, 20, 21, 28]])
    add([30, 20, 1.5, 8], [[30, 20, 31.5, 20, 31.5, 28]])
    # An image whose only annotations are at most 1 pixel wide or high: the train filter drops it.
    sliver = with_objects[5]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != sliver["id"]]
    add([5, 5, 1, 20], [[5, 5, 6, 5, 6, 25]], image_id=sliver["id"])
    add([5, 5, 20, 0.5], [[5, 5, 25, 5, 25, 5.5]], image_id=sliver["id"])

    annotations = root / "instances_odd.json"
    annotations.write_text(json.dumps(data))
    left_out = {corrupt: "image: does not decode", truncated: "image: does not decode", missing: "image: file missing or unreadable"}
    return images, annotations, left_out


@pytest.fixture(scope="module")
def odd_shards(odd_coco, tmp_path_factory) -> Path:
    images, annotations, _ = odd_coco
    out = tmp_path_factory.mktemp("odd_shards")
    _run_tool("--images", images, "--annotations", annotations, "--out", out, "--mode", "train",
              "--samples-per-shard", 5, "--workers", 2, "--seed", 7)
    return out


# ----------------------------------------------------------------------------- round trips


def test_train_shards_round_trip_through_webdataset(synthetic_coco, train_shards):
    stored = check_round_trip_with_webdataset(train_shards, synthetic_coco.train_json)
    assert stored == reference_kept_image_ids(COCO(str(synthetic_coco.train_json)))
    manifest = read_manifest(train_shards)
    assert manifest["samples"] == len(stored)
    assert len(manifest["shards"]) > 2 and {s["group"] for s in manifest["shards"]} == {"landscape", "portrait"}


def test_eval_shards_keep_every_image_without_crowd(synthetic_coco, val_shards):
    coco = COCO(str(synthetic_coco.val_json))
    assert check_round_trip_with_webdataset(val_shards, synthetic_coco.val_json) == set(coco.getImgIds())
    manifest = read_manifest(val_shards)
    assert manifest["mode"] == "eval" and "crowd" in manifest["instances"]
    crowd = [k for k in manifest["dropped"] if k.startswith("instance: crowd")]
    assert [manifest["dropped"][k] for k in crowd] == [len(coco.getAnnIds(iscrowd=True))]


def test_every_shard_holds_one_orientation_and_shuffled_ids(train_shards):
    ids = []
    for tar in sorted(train_shards.glob("*.tar")):
        group = tar.name.split("-")[1]
        metas = [json.loads(s["json"]) for s in read_with_webdataset(tar)]
        assert all(("portrait" if m["height"] > m["width"] else "landscape") == group for m in metas)
        ids += [m["image_id"] for m in metas]
    assert ids != sorted(ids), "samples are expected in seeded shuffled order, not by id"


def test_dali_reader_with_the_written_indices(synthetic_coco, train_shards):
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted(train_shards.glob("*.tar"))
    components = ["jpg", "json", "boxes", "labels", "polys", "verts"]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def read_shards():
        jpg, meta, boxes, labels, polys, verts = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars], ext=components,
            dtypes=[types.UINT8, types.UINT8, types.FLOAT, types.INT32, types.INT32, types.FLOAT], name="reader",
        )
        return fn.decoders.image(jpg, device="cpu"), meta, boxes, labels, polys, verts

    pipe = read_shards()
    pipe.build()
    coco = COCO(str(synthetic_coco.train_json))
    seen = set()
    for _ in range(pipe.reader_meta("reader")["epoch_size"]):
        image, meta, boxes, labels, polys, verts = (np.array(out[0]) for out in pipe.run())
        meta = json.loads(meta.tobytes())
        assert image.shape == (meta["height"], meta["width"], 3)
        assert_sample_matches_json(
            coco, meta, boxes.reshape(-1, 4), labels, polys.reshape(-1, 3), verts.reshape(-1, 2)
        )
        seen.add(meta["image_id"])
    assert seen == reference_kept_image_ids(coco)


# ----------------------------------------------------------------------------- rules and odd input


def test_filter_and_rules_on_odd_input(odd_coco, odd_shards):
    images, annotations, left_out = odd_coco
    coco = COCO(str(annotations))
    stored = check_round_trip_with_webdataset(odd_shards, annotations)
    missing_ids = {i["id"] for i in coco.dataset["images"] if i["file_name"] in left_out}
    assert stored == reference_kept_image_ids(coco) - missing_ids

    manifest = read_manifest(odd_shards)
    assert manifest["undecodable"] == sorted(left_out)
    dropped, repaired = manifest["dropped"], manifest["repaired"]
    assert dropped["image: does not decode"] == 2 and dropped["image: file missing or unreadable"] == 1
    assert dropped["image: no annotation (train filter)"] == sum(
        1 for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i, iscrowd=None)
    )
    assert dropped["image: every bbox has width or height <= 1 (train filter)"] == 1
    assert dropped["instance: bbox width or height <= 1 pixel after clipping (the reference's remove_empty)"] == 2
    assert dropped["polygon: fewer than 3 points"] == 2
    assert repaired["instance: no polygon left (kept for its box, with an empty mask)"] == 1
    assert repaired["instance: bbox clipped to the image"] == 1
    assert repaired["image: re-encoded as JPEG (source was not an RGB or grayscale JPEG)"] == 1

    expected = [expected_instances(coco, i) for i in stored]
    assert manifest["max_instances"] == max(len(labels) for _, labels, _ in expected)
    assert manifest["max_polygons"] == max(sum(map(len, polygons)) for _, _, polygons in expected)
    assert manifest["max_vertices"] == max(sum(len(p) for parts in polygons for p in parts) for _, _, polygons in expected)
    verify_shards(odd_shards)


@pytest.fixture(scope="module")
def non_finite_coco(synthetic_coco, tmp_path_factory) -> Path:
    """The synthetic train annotations with NaN and infinite coordinates (Python's json writes and reads them)."""
    data = json.loads(synthetic_coco.train_json.read_text())
    plain = [a for a in data["annotations"] if not a["iscrowd"] and isinstance(a["segmentation"], list)]
    plain[0]["bbox"][0] = float("nan")
    plain[1]["bbox"][3] = float("inf")
    plain[2]["segmentation"] = [plain[2]["segmentation"][0], [1.0, 1.0, float("-inf"), 5.0, 9.0, 9.0]]
    plain[3]["segmentation"] = [[1e39, 1.0, 5.0, 5.0, 9.0, 1.0]]  # infinite in float32: kept without a polygon
    # An image whose only annotation has a NaN box: the train filter sees no annotation.
    lonely = next(i["id"] for i in data["images"] if i["id"] not in {a["image_id"] for a in plain[:4]})
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != lonely]
    data["annotations"].append({**plain[4], "id": 10**6, "image_id": lonely, "bbox": [float("nan")] * 4})
    path = tmp_path_factory.mktemp("non_finite") / "instances_train.json"
    path.write_text(json.dumps(data))
    return path


def test_non_finite_coordinates_are_dropped_with_their_own_reasons(synthetic_coco, non_finite_coco, tmp_path, capsys):
    _run_tool("--images", synthetic_coco.train_images, "--annotations", non_finite_coco, "--out", tmp_path / "out",
              "--mode", "train", "--samples-per-shard", 5)
    printed = capsys.readouterr().out
    coco = COCO(str(non_finite_coco))
    # What is stored is what the rules computed here from the JSON give, no more.
    assert check_round_trip_with_webdataset(tmp_path / "out", non_finite_coco) == reference_kept_image_ids(coco)
    dropped = read_manifest(tmp_path / "out")["dropped"]
    assert dropped["instance: bbox has a NaN or infinite coordinate"] == 3
    assert dropped["polygon: NaN or infinite coordinate (in float32)"] == 2
    assert "instance: bbox has a NaN or infinite coordinate" in printed
    for sample in read_with_webdataset(tmp_path / "out"):
        for name in ("boxes", "verts"):
            assert np.isfinite(np.frombuffer(sample[name], "<f4")).all()
    verify_shards(tmp_path / "out")


def test_same_input_gives_identical_files_whatever_the_worker_count(odd_coco, odd_shards, tmp_path):
    images, annotations, _ = odd_coco
    shard_coco(images, annotations, tmp_path, mode="train", samples_per_shard=5, workers=1, seed=7)

    def files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(root.iterdir())}

    assert files(tmp_path) == files(odd_shards)


def test_resharding_a_folder_replaces_old_shards(synthetic_coco, tmp_path):
    shard_coco(synthetic_coco.val_images, synthetic_coco.val_json, tmp_path, mode="eval", samples_per_shard=2)
    manifest = shard_coco(synthetic_coco.val_images, synthetic_coco.val_json, tmp_path, mode="eval",
                          samples_per_shard=100)
    names = {s["name"] for s in manifest["shards"]}
    assert {p.name for p in tmp_path.iterdir()} == (
        names | {n.replace(".tar", ".idx") for n in names} | {"manifest.json"}
    )
    verify_shards(tmp_path)


def test_cli_prints_reasons_and_rates(synthetic_coco, tmp_path, capsys):
    _run_tool("--images", synthetic_coco.val_images, "--annotations", synthetic_coco.val_json, "--out", tmp_path,
              "--mode", "eval", "--samples-per-shard", 100)
    lines = capsys.readouterr().out.splitlines()
    assert any("instance: crowd" in line for line in lines)
    assert "images/s" in lines[-1] and "MB/s" in lines[-1]
