"""Fine-tuning through the real command line: a 5-class checkpoint (4 categories + background)
trained on an 80-category data set with `train.weights=`.

Everything that fits is loaded, the class-specific layers start fresh (with the reference's
init) and the log names them, and a shape mismatch elsewhere is one sentence naming the layer
and the config key. The run uses a negligible learning rate, so its final weights show what
was loaded: equal to the source checkpoint's where loaded, at their initialization elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.weights import CLASS_SPECIFIC
from pipeline.sharding import shard_coco
from pipeline.synthetic_coco import make_synthetic_coco, synthetic_categories
from tests.model_helpers import TINY_RUN, random_checkpoint
from train.checkpoint import list_checkpoints
from train.config import load_config
from train.main import run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
TINY = [*TINY_RUN, "solver.max_iter=2", "solver.steps=[4, 5]", "solver.warmup_iters=0", "solver.warmup_factor=1.0",
        "solver.base_lr=1e-12", "train.loss_readback_every=1"]


@pytest.fixture(scope="module")
def coco80(tmp_path_factory):
    """An 80-category synthetic set (every COCO category listed), sharded: (train, val, val annotations)."""
    root = tmp_path_factory.mktemp("coco80")
    paths = {}
    for split, count, mode in (("train", 8, "train"), ("val", 4, "eval")):
        annotations = make_synthetic_coco(root, split, count, seed=3, image_size=(64, 80), num_classes=80, max_objects=3)
        shard_coco(root / f"{split}2017", annotations, root / f"shards-{split}", mode=mode, samples_per_shard=8, seed=0)
        paths[split], paths[f"{split}_annotations"] = root / f"shards-{split}", annotations
    return paths


@pytest.fixture(scope="module")
def five_class_checkpoint(tmp_path_factory):
    """A trainer checkpoint of the demo model for 4 categories (5 classes), random weights."""
    categories = [{"id": i, "coco_id": c["id"], "name": c["name"]} for i, c in enumerate(synthetic_categories(4), start=1)]
    return random_checkpoint(tmp_path_factory.mktemp("source"), load_config(DEMO), categories)


def _command(coco80, output_dir, *extra):
    return [
        sys.executable, str(REPO / "train" / "main.py"), "--config", str(DEMO), "--data", str(coco80["train"]),
        "--val-data", str(coco80["val"]), "--val-annotations", str(coco80["val_annotations"]),
        *TINY, f"output_dir={output_dir}", *extra,
    ]


def test_a_five_class_checkpoint_fine_tunes_on_80_classes(coco80, five_class_checkpoint, tmp_path):
    result = subprocess.run(_command(coco80, tmp_path, f"train.weights={five_class_checkpoint}"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    fresh_line = next(line for line in result.stdout.splitlines() if "start fresh" in line)
    assert "4 categories (person, " in fresh_line and "80 categories" in fresh_line
    assert fresh_line.endswith(", ".join(CLASS_SPECIFIC))

    source = torch.load(five_class_checkpoint, weights_only=True)["model"]
    saved = torch.load(list_checkpoints(tmp_path)[-1], weights_only=True)
    tuned = saved["model"]
    assert [c["name"] for c in saved["categories"]][:2] == ["person", "bicycle"] and len(saved["categories"]) == 80
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape[0] == 81
    assert tuned["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4 * 81
    assert tuned["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 81
    # The reference's init for the fresh layers: N(0, 0.01) class scores, N(0, 0.001) box deltas, zero biases.
    assert tuned["roi_heads.box_predictor.cls_score.weight"].std() == pytest.approx(0.01, rel=0.1)
    assert tuned["roi_heads.box_predictor.bbox_pred.weight"].std() == pytest.approx(0.001, rel=0.1)
    assert torch.allclose(tuned["roi_heads.box_predictor.cls_score.bias"], torch.zeros(81), atol=1e-6)
    loaded = [k for k in source if k not in CLASS_SPECIFIC and not k.endswith("num_batches_tracked")]
    assert len(loaded) > 80
    for key in loaded:  # everything else came from the checkpoint (the LR is 1e-12)
        torch.testing.assert_close(tuned[key], source[key], atol=1e-6, rtol=0, msg=key)

    # Resumed from its folder alone, the run continues from its checkpoint: train.weights is not loaded again.
    resumed = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), "--resume", str(tmp_path), "solver.max_iter=3"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {list_checkpoints(tmp_path)[-2]} at iteration 2" in resumed.stdout
    assert "start fresh" not in resumed.stdout and "loaded" not in resumed.stdout


def test_a_shape_mismatch_outside_the_class_layers_is_one_sentence(coco80, five_class_checkpoint, tmp_path, capsys):
    argv = _command(coco80, tmp_path, f"train.weights={five_class_checkpoint}", "model.roi_heads.box_head_dim=128")[2:]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: trainer checkpoint {five_class_checkpoint}: roi_heads.box_head.")
    assert "set model.roi_heads.box_head_dim" in err
    assert not list_checkpoints(tmp_path)


@pytest.mark.slow
def test_training_from_torchvisions_coco_file_sets_what_the_file_needs(coco80, tmp_path):
    """torchvision's COCO Mask R-CNN (a ResNet-50 with the stride in the 3x3 conv, RGB normalization, its anchors)
    fine-tunes with the reference config as it is: the run sets the three keys and says so."""
    import torchvision

    weights = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), weights)
    out = tmp_path / "run"
    argv = [
        "--data", str(coco80["train"]), f"output_dir={out}", f"train.weights={weights}", "eval.every_epochs=0",
        "data.min_size=64", "data.max_size=80", "data.buckets=[[64, 80], [80, 64]]", "solver.ims_per_batch=2",
        "solver.max_iter=1", "solver.warmup_iters=0", "solver.warmup_factor=1.0", "train.num_threads=1",
        "data.dali_threads=1", "data.torch_workers=0",
    ]
    result = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), *argv], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"torchvision Mask R-CNN {weights} was trained with model.backbone.stride_in_1x1=false, model.normalization=rgb, "
            "model.convention=torchvision: set for this run") in result.stdout
    saved = load_config(out / "config.yaml")
    assert (saved.model.backbone.stride_in_1x1, saved.model.normalization, saved.model.convention) == (
        False, "rgb", "torchvision")
