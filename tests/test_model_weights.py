"""Weight import: Detectron's R-50.pkl (written here with its real blob names and shapes),
torchvision's ResNet-50 and Mask R-CNN state dicts, our checkpoints, fine-tuning onto other
categories, and refusal of pickles that run code."""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from model import build_model
from model.weights import (
    CHECKPOINT,
    CLASS_SPECIFIC,
    MSRA,
    STATE_DICT,
    TORCHVISION_MASKRCNN,
    TORCHVISION_RESNET,
    WeightsError,
    load_weights,
    read_weights,
)
from pipeline.coco_categories import COCO_CATEGORY_IDS, coco_categories
from tests.model_helpers import model_config

BODY = "static_part.backbone.body."


def msra_r50_blobs(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Blobs named and shaped as in Detectron's R-50.pkl, and which of our body keys each feeds."""
    blobs, ours = {}, {}

    def add(blob, shape, key):
        blobs[blob] = rng.standard_normal(shape).astype(np.float32)
        if key:
            ours[blob] = key

    add("conv1_w", (64, 3, 7, 7), "conv1.weight")
    add("res_conv1_bn_s", (64,), "bn1.weight")
    add("res_conv1_bn_b", (64,), "bn1.bias")
    in_channels = 64
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3)):
        planes = 64 * 2 ** (stage - 2)
        for i in range(blocks):
            layer = f"layer{stage - 1}.{i}"
            shapes = {"a": (planes, in_channels, 1, 1), "b": (planes, planes, 3, 3), "c": (4 * planes, planes, 1, 1)}
            for n, (branch, shape) in enumerate(shapes.items(), start=1):
                add(f"res{stage}_{i}_branch2{branch}_w", shape, f"{layer}.conv{n}.weight")
                add(f"res{stage}_{i}_branch2{branch}_bn_s", shape[:1], f"{layer}.bn{n}.weight")
                add(f"res{stage}_{i}_branch2{branch}_bn_b", shape[:1], f"{layer}.bn{n}.bias")
            if i == 0:
                add(f"res{stage}_0_branch1_w", (4 * planes, in_channels, 1, 1), f"{layer}.downsample.0.weight")
                add(f"res{stage}_0_branch1_bn_s", (4 * planes,), f"{layer}.downsample.1.weight")
                add(f"res{stage}_0_branch1_bn_b", (4 * planes,), f"{layer}.downsample.1.bias")
            in_channels = 4 * planes
    add("fc1000_w", (1000, 2048), None)
    add("fc1000_b", (1000,), None)
    return blobs, ours


@pytest.fixture(scope="module")
def r50():
    return build_model(model_config())


def test_msra_pickle_loads_every_blob(r50, tmp_path):
    blobs, ours = msra_r50_blobs(np.random.default_rng(0))
    path = tmp_path / "R-50.pkl"
    with path.open("wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    report = load_weights(r50, path, for_training=True)
    state = r50.state_dict()
    for blob, key in ours.items():
        assert torch.equal(state[BODY + key], torch.from_numpy(blobs[blob])), key
    assert len(report.loaded) >= len(ours) and report.unexpected == []
    # Frozen norms apply exactly the Caffe2 affine: x * s + b.
    bn = r50.static_part.backbone.body.layer1[0].bn2
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    torch.testing.assert_close(scale, torch.from_numpy(blobs["res2_0_branch2b_bn_s"]), rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.bias - bn.running_mean * scale, torch.from_numpy(blobs["res2_0_branch2b_bn_b"]))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickle_that_calls_a_function_is_refused(r50, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"conv1_w": RunsCode(marker)}, protocol=2))
    with pytest.raises(WeightsError, match="evil.pkl.*posix.mkdir"):
        load_weights(r50, path, for_training=True)
    assert not marker.exists()


def test_msra_weights_need_stride_in_1x1(tmp_path):
    model = build_model(model_config("model.backbone.depth=14", "model.backbone.stride_in_1x1=false"))
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({}, protocol=2))
    with pytest.raises(WeightsError, match="trained with model.backbone.stride_in_1x1=true.*; set model.backbone.stride_in_1x1=true$"):
        load_weights(model, path, for_training=True)


def test_torchvision_resnet50_loads_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    # torchvision's BN epsilon (1e-5) comes with its convention; the reference's frozen BN has none.
    config = model_config("model.backbone.stride_in_1x1=false", "model.normalization=rgb", "model.convention=torchvision")
    model = build_model(config).eval()
    report = load_weights(model, path, for_training=True)
    assert BODY + "layer4.2.conv3.weight" in report.loaded and report.unexpected == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(resnet.children())[:-2])(x)
        torch.testing.assert_close(model.static_part.backbone.body(x)["3"], expected, atol=1e-4, rtol=1e-4)


def test_torchvision_maskrcnn_checkpoint_with_old_names_and_coco_ids(tmp_path):
    torch.manual_seed(0)
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state = {k: v for k, v in theirs.state_dict().items() if not k.endswith("num_batches_tracked")}
    # The published checkpoint predates Conv2dNormActivation: old names for the RPN conv, FPN and mask head.
    old = {}
    for k, v in state.items():
        if k.startswith(("rpn.head.conv", "backbone.fpn.")):
            k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.").replace(".0.weight", ".weight").replace(".0.bias", ".bias")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        old[k] = v
    assert "rpn.head.conv.weight" in old and "roi_heads.mask_head.mask_fcn4.weight" in old
    path = tmp_path / "maskrcnn.pth"
    torch.save(old, path)
    model = build_model(model_config("model.backbone.stride_in_1x1=false", "model.normalization=rgb"))  # 81 classes
    load_weights(model, path)
    ours = model.state_dict()
    rows = torch.tensor([0, *COCO_CATEGORY_IDS])
    for key in ("box_predictor.cls_score.weight", "mask_predictor.mask_fcn_logits.weight"):
        assert torch.equal(ours[f"roi_heads.{key}"], state[f"roi_heads.{key}"][rows]), key
    box_bias = "roi_heads.box_predictor.bbox_pred.bias"
    assert torch.equal(ours[box_bias].view(-1, 4), state[box_bias].view(-1, 4)[rows])
    renamed = {
        "static_part.rpn_head.conv.0.0.weight": "rpn.head.conv.0.0.weight",
        "static_part.backbone.fpn.inner_blocks.2.0.weight": "backbone.fpn.inner_blocks.2.0.weight",
        "roi_heads.mask_head.3.0.weight": "roi_heads.mask_head.3.0.weight",
    }
    for our_key, their_key in renamed.items():
        assert torch.equal(ours[our_key], state[their_key]), our_key
    assert torch.equal(ours[BODY + "bn1.running_var"], state["backbone.body.bn1.running_var"])


def test_unknown_and_incomplete_files_are_named(tmp_path, r50):
    path = tmp_path / "other.pth"
    torch.save({"something.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="other.pth is neither"):
        load_weights(r50, path)
    blobs, _ = msra_r50_blobs(np.random.default_rng(1))
    del blobs["res4_5_branch2c_w"]
    pkl = tmp_path / "partial.pkl"
    pkl.write_bytes(pickle.dumps(blobs, protocol=2))
    with pytest.raises(WeightsError, match="res4_5_branch2c_w"):
        load_weights(r50, pkl, for_training=True)


TINY_DEMO = ("model.backbone.depth=14", "model.backbone.width=16", "model.backbone.norm=gn", "model.fpn_channels=32",
             "model.roi_heads.box_head_dim=64", "model.roi_heads.mask_head_channels=[16, 16]")


def _checkpoint_file(path, model, categories, config):
    """What train/checkpoint.py writes, reduced to what weight import reads."""
    torch.save({"format": "maskrcnn-train-checkpoint/1", "model": model.state_dict(), "config": config,
                "categories": categories}, path)
    return path


def test_every_format_is_told_apart_by_its_content(tmp_path):
    torch.manual_seed(0)
    ours = build_model(model_config(*TINY_DEMO), num_classes=5)
    cfg = {"model": ours.config}
    torchvision_model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    files = {
        "ckpt.pt": ({"format": "x", "model": ours.state_dict(), "config": cfg}, CHECKPOINT),
        "ours.pt": (ours.state_dict(), STATE_DICT),
        "tv.pth": (torchvision_model.state_dict(), TORCHVISION_MASKRCNN),
        "tv-reference-trainer.pth": ({"model": torchvision_model.state_dict(), "epoch": 25}, TORCHVISION_MASKRCNN),
        "resnet.pth": (torchvision.models.resnet50(weights=None).state_dict(), TORCHVISION_RESNET),
    }
    for name, (content, kind) in files.items():
        torch.save(content, tmp_path / name)
        assert read_weights(tmp_path / name).kind == kind, name
    (tmp_path / "R-50.pkl").write_bytes(pickle.dumps({"blobs": {}}, protocol=2))
    assert read_weights(tmp_path / "R-50.pkl").kind == MSRA
    assert read_weights(tmp_path / "tv.pth").model_overrides() == [
        "model.backbone.stride_in_1x1=false", "model.normalization=rgb", "model.convention=torchvision"]


def test_fine_tuning_onto_a_subset_of_the_categories_keeps_their_rows(tmp_path):
    torch.manual_seed(0)
    coco = build_model(model_config(*TINY_DEMO), num_classes=81)
    path = _checkpoint_file(tmp_path / "coco.pt", coco, coco_categories(), {"model": coco.config})
    subset = [{"id": i, "coco_id": c["coco_id"], "name": c["name"]} for i, c in enumerate(coco_categories()[2::20], start=1)]
    model = build_model(model_config(*TINY_DEMO), num_classes=len(subset) + 1)
    report = load_weights(model, path, subset, for_training=True)
    assert report.fresh == []
    rows = [0, *(COCO_CATEGORY_IDS.index(c["coco_id"]) + 1 for c in subset)]  # contiguous rows of the source
    source, ours = coco.state_dict(), model.state_dict()
    for key in CLASS_SPECIFIC:
        per_row = 4 if "bbox_pred" in key else 1
        expected = source[key].view(81, per_row, *source[key].shape[1:])[rows].flatten(0, 1)
        assert torch.equal(ours[key], expected), key


def test_other_categories_start_fresh_when_training_and_are_refused_otherwise(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_model(model_config(*TINY_DEMO), num_classes=3)
    cats = [{"id": 1, "coco_id": 1, "name": "cat"}, {"id": 2, "coco_id": 2, "name": "dog"}]
    path = _checkpoint_file(tmp_path / "pets.pt", source, cats, {"model": source.config})
    other = [{"id": 1, "coco_id": 1, "name": "car"}, {"id": 2, "coco_id": 2, "name": "bus"}]  # same count, other classes
    model = build_model(model_config(*TINY_DEMO), num_classes=3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("WARNING"):
        report = load_weights(model, path, other, for_training=True)
    assert report.fresh == list(CLASS_SPECIFIC)
    assert "2 categories (cat, dog) are not the data's 2 categories (car, bus)" in caplog.text
    for key in CLASS_SPECIFIC:
        assert torch.equal(model.state_dict()[key], initial[key]), key
    with pytest.raises(WeightsError, match=r"pets.pt detects 2 categories \(cat, dog\) but the data has 2 categories \(car, bus\)"):
        load_weights(build_model(model_config(*TINY_DEMO), num_classes=3), path, other)


def test_a_checkpoint_refuses_a_model_with_another_normalization(tmp_path):
    source = build_model(model_config(*TINY_DEMO), num_classes=3)
    path = _checkpoint_file(tmp_path / "c.pt", source, None, {"model": source.config})
    model = build_model(model_config(*TINY_DEMO, "model.normalization=rgb"), num_classes=3)
    with pytest.raises(WeightsError, match="trained with model.normalization=bgr255, but the model is built with 'rgb'; set model.normalization=bgr255$"):
        load_weights(model, path)
