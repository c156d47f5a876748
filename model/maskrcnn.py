"""Mask R-CNN: a graph-capturable static part, then sync-free proposals, heads and losses.

Module names follow torchvision's `maskrcnn_resnet50_fpn` under `static_part`
(`static_part.backbone.body.*`, `static_part.backbone.fpn.*`, `static_part.rpn_head.*`)
and `roi_heads` (`box_head`, `box_predictor`, `mask_head`, `mask_predictor`), so weights
move between the two by a prefix (model/weights.py).
"""

from __future__ import annotations

from typing import Any, Callable

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


def graph_key(images: Tensor) -> GraphKey:
    """What a captured graph is specific to: the input shape and dtype, and the autocast dtype (None: off)."""
    device_type = images.device.type
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return tuple(images.shape), images.dtype, autocast


class StaticPart(nn.Module):
    """Normalization + backbone + FPN + RPN head: uint8 padded images [B, 3, H, W] and their
    sizes [B, 2] -> a flat tuple of tensors.

    Output: 5 FPN features (P2..P6), then 5 objectness maps [B, A, h, w], then 5 delta maps
    [B, 4A, h, w]. Its shapes depend only on the input shape, so the trainer captures it as
    one CUDA graph per bucket shape, under the training step's autocast:

        with autocast():                                   # cache_enabled=False
            model.static_part.capture(sample_images, sample_sizes)

    The graphs belong to this module (`graphs`, not part of the state dict): `forward` replays
    one only in training mode, and only for the input shape and autocast state it was captured
    with; in eval mode, or for any other input, it runs eagerly in the caller's precision. So
    evaluation never replays the training graph, whatever its batch shape. `replays` counts
    the replays (a host-side count: reading it costs nothing).
    """

    def __init__(self, normalize: InputNormalization, backbone: BackboneWithFPN, rpn_head: RPNHead):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.rpn_head = rpn_head
        self.graphs: dict[GraphKey, Callable[[Tensor, Tensor], tuple[Tensor, ...]]] = {}
        self.replays = 0

    def compute(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        features = list(self.backbone(self.normalize(images, image_sizes)).values())
        objectness, deltas = self.rpn_head(features)
        return (*features, *objectness, *deltas)

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        graphed = self.graphs.get(graph_key(images)) if self.training else None
        if graphed is None:
            return self.compute(images, image_sizes)
        self.replays += 1
        return graphed(images, image_sizes)

    def capture(self, images: Tensor, image_sizes: Tensor) -> None:
        """Capture forward and backward for this input shape as CUDA graphs, in the current autocast state.

        `torch.cuda.make_graphed_callables` runs its own warm-up iterations on a side stream, then
        captures; it needs autocast's weight cache off (cache_enabled=False), and so does every
        step that replays. The graphs read the parameters in place, so the optimizer, DDP and
        the state dict keep working on the same tensors.
        """
        if not self.training:
            raise RuntimeError("capture the static part in training mode: only training steps replay its graphs")
        graphed = torch.cuda.make_graphed_callables(_EagerView(self), (images, image_sizes), num_warmup_iters=3)
        self.register_graph(images, graphed)

    def register_graph(self, images: Tensor, graphed: Callable[[Tensor, Tensor], tuple[Tensor, ...]]) -> None:
        """Replay `graphed` in training mode for inputs like `images` under the current autocast state."""
        self.graphs[graph_key(images)] = graphed


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
