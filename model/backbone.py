"""ResNet body + FPN (P2-P6), assembled from torchvision's building blocks.

Own ResNet assembly, torchvision blocks: torchvision's `ResNet` fixes the stem at 64 channels
and only knows the standard depths, while demo configs need smaller widths and depths; the
blocks (`Bottleneck`), the FPN (`FeaturePyramidNetwork` + `LastLevelMaxPool`) and the
feature extraction (`BackboneWithFPN`) are torchvision's, so state dict names match
torchvision's ResNet (`conv1`, `bn1`, `layer1.0.conv1`, ...) and detection models
(`body.*`, `fpn.*`). The blocks only run differently: each conv + frozen BN as one
convolution (`conv_norm`), which computes the same map with fewer passes over the activations.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from model.choices import BLOCKS_PER_STAGE, NORMS

GROUP_NORM_GROUPS = 32


class BackboneError(ValueError):
    """A backbone setting the user can fix in the config."""


def norm_layer_factory(norm: str, frozen_bn_eps: float) -> Callable[[int], nn.Module]:
    """`frozen_bn` (the reference: fixed affine), `bn` or `gn` (trainable, for from-scratch demos).

    frozen_bn_eps: added to the running variance; the reference's FrozenBatchNorm2d adds nothing
    (0: with the R-50.pkl's unit variances its scale is the weight itself), torchvision's 1e-5.
    """
    if norm == "frozen_bn":
        return functools.partial(FrozenBatchNorm2d, eps=frozen_bn_eps)
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, channels), channels)
    raise BackboneError(f"model.backbone.norm must be one of {', '.join(NORMS)}, got {norm!r}")


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """`norm(conv(x))`; with a FrozenBatchNorm2d as one convolution, its scale folded into the weights.

    A frozen BN is an affine map per output channel, so conv(x, w) * s + b = conv(x, w * s) + b.
    Folded, the convolution adds the shift as its bias and the two passes of a separate BN over the
    activations (and the one in backward) are gone. The fold is recomputed every call (a
    weight-sized product), so gradients reach `conv.weight`.
    """
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


class FoldedBottleneck(Bottleneck):
    """torchvision's Bottleneck (same modules and names) running each conv + norm through `conv_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        out += identity
        return self.relu(out)


class ResNetBody(nn.Module):
    """Stem + res2..res5 (`layer1`..`layer4`) of a bottleneck ResNet; no pooling head.

    stride_in_1x1: the MSRA/Caffe2 ResNet (Detectron's R-50.pkl) downsamples in the first 1x1
    conv of a stage; torchvision's ("ResNet v1.5") in the 3x3 conv. The weights only fit the
    variant they were trained with.
    """

    def __init__(self, depth: int, width: int, stride_in_1x1: bool, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise BackboneError(f"model.backbone.depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}")
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = width
        self.stage_channels = []
        for stage, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            blocks = []
            for i in range(num_blocks):
                downsample = None
                if i == 0:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                        norm_layer(planes * Bottleneck.expansion),
                    )
                block = FoldedBottleneck(in_channels, planes, stride if i == 0 else 1, downsample, norm_layer=norm_layer)
                if i == 0 and stride_in_1x1:
                    block.conv1.stride, block.conv2.stride = (stride, stride), (1, 1)
                blocks.append(block)
                in_channels = planes * Bottleneck.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.stage_channels.append(in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's ResNet initialization (used only when training from scratch).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def freeze_stages(body: ResNetBody, freeze_at: int) -> None:
    """Stop gradients into the stem (freeze_at >= 1) and res2..res{freeze_at} (the reference: 2)."""
    frozen = [body.conv1, body.bn1][: 2 if freeze_at >= 1 else 0]
    frozen += [getattr(body, f"layer{i}") for i in range(1, freeze_at)]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def build_backbone(
    depth: int, width: int, stride_in_1x1: bool, norm: str, freeze_at: int, fpn_channels: int, frozen_bn_eps: float
) -> BackboneWithFPN:
    """ResNet body with FPN outputs P2-P5 ('0'..'3') and P6 ('pool', a stride-2 max pool of P5)."""
    body = ResNetBody(depth, width, stride_in_1x1, norm_layer_factory(norm, frozen_bn_eps))
    freeze_stages(body, freeze_at)
    return_layers = {f"layer{i + 1}": str(i) for i in range(4)}
    return BackboneWithFPN(
        body, return_layers, body.stage_channels, fpn_channels, extra_blocks=LastLevelMaxPool()
    )


__all__ = ["build_backbone", "BackboneError", "ResNetBody"]
