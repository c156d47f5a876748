"""Mask R-CNN: a graph-capturable static part, then sync-free proposals, heads and losses.

Module names follow torchvision's `maskrcnn_resnet50_fpn` under `static_part`
(`static_part.backbone.body.*`, `static_part.backbone.fpn.*`, `static_part.rpn_head.*`)
and `roi_heads` (`box_head`, `box_predictor`, `mask_head`, `mask_predictor`), so weights
move between the two by a prefix (model/weights.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.rpn import RPNHead

from model.detections import Detections
from model.normalization import InputNormalization
from model.rpn import RegionProposals, flatten_head_outputs
from model.roi_heads import RoIHeads
from pipeline.batch import Batch

NUM_LEVELS = 5  # P2-P6


GraphKey = tuple[tuple[int, ...], torch.dtype, torch.dtype | None]
Graphed = Callable[[Tensor, Tensor], tuple[Tensor, ...]]


def graph_key(images: Tensor) -> GraphKey:
    """What a captured graph is specific to: the input shape and dtype, and the autocast dtype (None: off)."""
    device_type = images.device.type
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return tuple(images.shape), images.dtype, autocast


class MissingGraphError(RuntimeError):
    """A training step of a captured static part met an input it holds no graph for."""


def make_graphed(module: nn.Module, sample: tuple[Tensor, Tensor]) -> Graphed:
    """CUDA graphs of `module`'s forward and backward for inputs like `sample` (3 warm-up iterations first)."""
    return torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=3)


class StaticPart(nn.Module):
    """Normalization + backbone + FPN + RPN head: uint8 padded images [B, 3, H, W] and their
    sizes [B, 2] -> a flat tuple of tensors.

    Output: 5 FPN features (P2..P6), then 5 objectness maps [B, A, h, w], then 5 delta maps
    [B, 4A, h, w]. Its shapes depend only on the input shape, so the trainer captures it as
    one CUDA graph per bucket shape, under the training step's autocast (cache_enabled=False):

        model.static_part.capture(bucket_shapes, images_per_rank, autocast)

    The graphs belong to this module (not part of the state dict). Once captured, `forward`
    in training mode replays the graph of the input's shape and autocast state, and raises
    MissingGraphError for any other input rather than run a different step than the one
    captured; in eval mode it always runs eagerly in the caller's precision, so evaluation
    never replays the training graph, whatever its batch shape. `replays` counts the replays
    (a host-side count: reading it costs nothing).
    """

    def __init__(self, normalize: InputNormalization, backbone: BackboneWithFPN, rpn_head: RPNHead):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.rpn_head = rpn_head
        self._graphs: dict[GraphKey, Graphed] = {}
        self.replays = 0

    @property
    def captured(self) -> bool:
        """Whether training steps replay captured graphs."""
        return bool(self._graphs)

    def compute(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        features = list(self.backbone(self.normalize(images, image_sizes)).values())
        objectness, deltas = self.rpn_head(features)
        return (*features, *objectness, *deltas)

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        if not (self.training and self._graphs):
            return self.compute(images, image_sizes)
        key = graph_key(images)
        graphed = self._graphs.get(key)
        if graphed is None:
            raise MissingGraphError(
                f"the static part holds CUDA graphs for {sorted(map(str, self._graphs))} (shape, dtype, autocast dtype) "
                f"but a training step got {key}: every training batch must have one of the captured bucket shapes, "
                "the captured batch size and run under the step's autocast"
            )
        self.replays += 1
        return graphed(images, image_sizes)

    def capture(
        self,
        shapes: Sequence[tuple[int, int]],
        batch_size: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
        graph_maker: Callable[[nn.Module, tuple[Tensor, Tensor]], Graphed] = make_graphed,
    ) -> None:
        """Capture forward and backward as CUDA graphs for `batch_size` images at each (height, width) of `shapes`.

        Each graph is captured under `autocast`, the training step's own context, which must
        have autocast's weight cache off (cache_enabled=False): a graph replays only under the
        autocast state it was captured in. `torch.cuda.make_graphed_callables` runs its own
        warm-up iterations on a side stream, then captures; the graphs read the parameters in
        place, so the optimizer, DDP and the state dict keep working on the same tensors.
        `graph_maker` is the capture itself (tests pass a stand-in, capturing needs CUDA).
        """
        if not self.training:
            raise RuntimeError("capture the static part in training mode: only training steps replay its graphs")
        device = next(self.parameters()).device
        for height, width in shapes:
            images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, device=device)
            images = images.contiguous(memory_format=torch.channels_last)
            sizes = torch.tensor([[height, width]] * batch_size, dtype=torch.int32, device=device)
            with autocast():
                self._graphs[graph_key(images)] = graph_maker(_EagerView(self), (images, sizes))


class _EagerView(nn.Module):
    """What `make_graphed_callables` captures: the static part's eager computation, sharing its parameters.

    A separate module, because make_graphed_callables replaces the forward of the module it is
    given (and the static part's own forward must keep choosing between graph and eager).
    """

    def __init__(self, static_part: StaticPart):
        super().__init__()
        self.static_part = static_part

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        return self.static_part.compute(images, image_sizes)


class MaskRCNN(nn.Module):
    """`model(batch)`: dict of the five losses in training, `Detections` in eval."""

    def __init__(self, static_part: StaticPart, proposals: RegionProposals, roi_heads: RoIHeads, config: dict[str, Any]):
        super().__init__()
        self.static_part = static_part
        self.proposals = proposals
        self.roi_heads = roi_heads
        self.config = config  # the resolved `model:` section it was built from, for checkpoints

    def forward(self, batch: Batch) -> dict[str, Tensor] | Detections:
        outputs = self.static_part(batch.images, batch.image_sizes)
        features = list(outputs[:NUM_LEVELS])
        objectness, deltas = flatten_head_outputs(
            list(outputs[NUM_LEVELS : 2 * NUM_LEVELS]), list(outputs[2 * NUM_LEVELS :])
        )
        anchors = self.proposals.anchors([tuple(f.shape[-2:]) for f in features], batch.images.device)
        # On CUDA in training, every step after the static part avoids host synchronization.
        sync_free = self.training and batch.images.is_cuda
        proposals, proposal_valid = self.proposals.propose(
            objectness, deltas, anchors, batch.image_sizes, sync_free
        )
        # RoIs pool from P2-P5 (P6 only feeds the RPN). roi_align reads float32 NCHW: converting
        # the (bf16, channels_last) features once here serves both poolers, and sums their
        # gradients before the one conversion back (model/pooler.py).
        box_features = [f.to(torch.float32, memory_format=torch.contiguous_format) for f in features[:-1]]
        if not self.training:
            return self.roi_heads.detect(box_features, proposals, proposal_valid, batch.image_sizes)
        gt_valid = torch.arange(batch.boxes.shape[1], device=batch.boxes.device)[None, :] < batch.num_boxes[:, None]
        losses = self.proposals.losses(objectness, deltas, anchors, batch.image_sizes, batch.boxes, gt_valid)
        losses.update(
            self.roi_heads.losses(
                box_features,
                proposals,
                proposal_valid,
                batch.boxes,
                batch.labels,
                gt_valid,
                batch.verts,
                batch.polys,
                batch.num_polys,
            )
        )
        return losses
