"""Evaluation after CUDA-graph capture: eval mode never replays the training graph, and runs under
the training precision. The graph is a stand-in callable here (capturing needs CUDA); the same
checks on a real capture are in tests/test_model_gpu.py."""

import functools

import pytest
import torch

from model import build_model
from model.synthetic_batch import synthetic_batch
from pipeline.loader import build_loader
from tests.model_helpers import TINY, model_config
from train.config import load_config
from model.maskrcnn import MissingGraphError
from train.engine import autocast_context, step_autocast
from train.evaluation import COCOEvaluator, inference_on_dataset

CPU = torch.device("cpu")


class StandInGraph:
    """Plays a captured bf16 training graph: the eager outputs in bfloat16; counts its calls."""

    def __init__(self, static_part):
        self.static_part = static_part
        self.calls = 0

    def __call__(self, images, image_sizes):
        self.calls += 1
        return tuple(o.to(torch.bfloat16) for o in self.static_part.compute(images, image_sizes))


def capture_stand_in(model, images) -> StandInGraph:
    """`StaticPart.capture` at the shape of `images` with a stand-in for the graph, under the bf16 step's autocast."""
    stand_in = StandInGraph(model.static_part)
    model.static_part.capture([images.shape[-2:]], len(images), step_autocast("bf16", CPU, cuda_graphs=True),
                              graph_maker=lambda module, sample: stand_in)
    return stand_in


def test_graphs_replay_only_in_training_under_the_autocast_they_were_captured_in():
    torch.manual_seed(0)
    model = build_model(model_config(*TINY), num_classes=4).train()
    batch = synthetic_batch(2, (128, 160), num_classes=4, max_gt=3, seed=1)
    assert not model.static_part.captured
    stand_in = capture_stand_in(model, batch.images)
    assert model.static_part.captured
    bf16 = step_autocast("bf16", CPU, cuda_graphs=True)
    with bf16():
        model(batch)
    assert stand_in.calls == 1 and model.static_part.replays == 1
    # a training step the graphs were not captured for fails loudly instead of running another step eagerly
    with pytest.raises(MissingGraphError, match=r"got \(\(2, 3, 128, 160\), torch.uint8, None\)"):
        model(batch)  # fp32: another precision than the graph's
    with pytest.raises(MissingGraphError, match="96, 160"), bf16():
        model(synthetic_batch(2, (96, 160), num_classes=4, max_gt=3, seed=1))  # another shape
    model.eval()
    with torch.inference_mode(), bf16():
        detections = model(batch)  # the training batch's shape, in eval mode: eager
    assert stand_in.calls == 1 and model.static_part.replays == 1
    assert detections.boxes.shape == (2, 100, 4)


def test_evaluation_after_capture_runs_eagerly_in_the_training_precision(val_shards, synthetic_coco):
    # The bug this guards against: eval batches of the train batch's shape replayed the bf16
    # training graph outside autocast, and roi_align failed after a whole epoch.
    cfg = load_config("configs/demo.yaml", ["data.backend=torch", "data.dali_threads=1", "data.torch_workers=0"])
    torch.manual_seed(0)
    evaluator = COCOEvaluator.for_shards(synthetic_coco.val_json, val_shards, num_workers=0)
    loader = build_loader(cfg.data, val_shards, training=False, batch_size=4)
    model = build_model(cfg.model, num_classes=len(loader.manifest["categories"]) + 1).train()
    first = next(iter(loader))
    stand_in = capture_stand_in(model, first.images)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_autocast_dtype("cpu")
                                                                      if torch.is_autocast_enabled("cpu") else None))
    metrics = inference_on_dataset(model, loader, evaluator, num_warmup=0,
                                   autocast=functools.partial(autocast_context, "bf16", CPU))
    assert stand_in.calls == 0 and model.static_part.replays == 0
    assert model.training  # restored
    assert seen and set(seen) == {torch.bfloat16}
    assert set(metrics) == {"bbox", "segm"}
