"""A trained model as an ONNX graph for deployment (tools/export.py), and that graph run again.

Why ONNX: the file runs without torch and without this code (onnxruntime in C++, C#, Java,
JavaScript and Python, TensorRT), and torch exports it through `torch.export`, which follows
the model's evaluation path as it runs here (`RoIHeads.detect` keeps no host-side counts for
that reason). TorchScript, the other format torch offers, is deprecated in the torch this
project pins (torch.jit.trace, script and load warn that they will go).

The graph is the model from uint8 pixels to padded detections, for one input shape (a static
bucket: each file serves the images of one orientation):

- inputs: `images` uint8 [1, 3, H, W], RGB, resized by the reference rule (shorter side
  data.min_size, longer at most data.max_size) and zero-padded to H x W; `image_sizes` int32
  [1, 2], the resized image's height and width inside the padding;
- outputs (model/detections.py): `boxes` float32 [1, D, 4] (xyxy in the resized image's pixels),
  `scores` [1, D], `labels` int64 [1, D] (the classes 1..K of export.json's categories, 0 past
  the count), `mask_probs` [1, D, 28, 28] (each box's mask probabilities), `num_detections` int32 [1].
  With model.convention=reference (export.json's `convention`) the boxes are the reference's
  inclusive pixel boxes (x2 - x1 + 1 pixels wide), mapped back and pasted as such.

`pipeline.images.batch_from_images` prepares the inputs, `run_onnx` runs the file on them, and
`train.inference.in_image_pixels` maps the outputs back to each image's pixels and pastes the
masks. Its detections equal PyTorch's within TOLERANCE: tools/export.py checks every file it
writes (`largest_differences`), and tests/test_export.py the detections on the val photos.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.detections import Detections
from pipeline.batch import Batch
from pipeline.images import unlabelled_batch

INPUTS = ("images", "image_sizes")
OUTPUTS = ("boxes", "scores", "labels", "mask_probs", "num_detections")
# The largest differences accepted between the ONNX graph's detections and PyTorch's (CPU, fp32):
# box coordinates in pixels, scores, mask probabilities; labels and counts are equal.
TOLERANCE = {"boxes": 1e-2, "scores": 1e-5, "mask_probs": 1e-4}


class DetectionGraph(nn.Module):
    """The model in evaluation from (images, image_sizes) to the Detections fields, as a tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        detections = self.model(unlabelled_batch(images, image_sizes, image_sizes))
        return tuple(getattr(detections, name) for name in OUTPUTS)


def export_onnx(model: nn.Module, path: str | Path, height: int, width: int) -> Path:
    """Write `model` (on the CPU, fp32) as an ONNX graph for uint8 images padded to height x width."""
    path = Path(path)
    graph = DetectionGraph(copy.deepcopy(model)).eval()  # the export leaves the module it traced unusable for eager runs
    images = torch.zeros((1, 3, height, width), dtype=torch.uint8)
    sizes = torch.tensor([[height, width]], dtype=torch.int32)
    with torch.no_grad():
        torch.onnx.export(graph, (images, sizes), str(path), dynamo=True, input_names=list(INPUTS),
                          output_names=list(OUTPUTS), verbose=False)
    return path


def onnx_session(path: str | Path) -> Any:
    """An onnxruntime session of an exported file, on the CPU."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def input_shape(session: Any) -> tuple[int, int]:
    """The (H, W) the session's graph takes."""
    return tuple(session.get_inputs()[0].shape[2:])


def run_onnx(session: Any, batch: Batch, inclusive: bool) -> Detections:
    """The exported graph on a batch padded to its input shape, one image at a time, as Detections.

    `inclusive`: the exported model follows the reference's box conventions (model.convention,
    export.json's `convention`), so its boxes are mapped back and pasted as inclusive pixel boxes.
    """
    per_image = []
    for i in range(batch.images.shape[0]):
        feed = {"images": batch.images[i : i + 1].contiguous().cpu().numpy(),
                "image_sizes": batch.image_sizes[i : i + 1].to(torch.int32).cpu().numpy()}
        per_image.append([torch.from_numpy(np.asarray(value)) for value in session.run(list(OUTPUTS), feed)])
    return Detections(*(torch.cat(parts) for parts in zip(*per_image)), inclusive=inclusive)


def largest_differences(model: nn.Module, session: Any, height: int, width: int) -> dict[str, float]:
    """The largest differences of each output between `session` (an exported `model`) and `model`,
    on one seeded random image of the file's shape."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=generator)
    sizes = torch.tensor([[height, width]], dtype=torch.int32)
    batch = unlabelled_batch(images, sizes, sizes)
    with torch.no_grad():
        ours = model(batch)
    theirs = run_onnx(session, batch, ours.inclusive)
    return {
        name: float((getattr(ours, name).float() - getattr(theirs, name).float()).abs().max()) for name in OUTPUTS
    }
