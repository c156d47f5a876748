"""What the `model:` config keys may choose among, as plain data that imports nothing heavy.

The config is validated once when it is loaded (train/config_schema.py reads these), so a bad
value stops a tool in one sentence before it pays seconds for importing torch; the modules that
build the model (model/backbone.py, model/normalization.py, model/box_ops.py, model/rpn.py) read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bottleneck blocks per stage (res2..res5); depth = 3 * sum(blocks) + 2.
BLOCKS_PER_STAGE = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NORMS = ("frozen_bn", "bn", "gn")  # what model/backbone.py's norm_layer_factory builds
# Whose box conventions a model follows (model.convention): the reference's inclusive pixel boxes and
# anchors (model/box_ops.py, model/rpn.py), or torchvision's continuous boxes and anchors.
CONVENTIONS = ("reference", "torchvision")


@dataclass(frozen=True)
class Normalization:
    """Per-channel (x - mean) / std on 0-255 pixels, in the channel order the weights expect."""

    channel_order: str  # "BGR" or "RGB"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


NORMALIZATIONS = {
    # Detectron's MSRA R-50.pkl (the reference's provided weights): BGR 0-255, mean subtraction only.
    "bgr255": Normalization("BGR", (102.9801, 115.9465, 122.7717), (1.0, 1.0, 1.0)),
    # torchvision ImageNet weights: RGB mean/std on 0-1 pixels, rescaled here to 0-255.
    "rgb": Normalization(
        "RGB",
        (0.485 * 255, 0.456 * 255, 0.406 * 255),
        (0.229 * 255, 0.224 * 255, 0.225 * 255),
    ),
}
