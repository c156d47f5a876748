"""Mask R-CNN ResNet-50-FPN: `build_model(cfg.model)`, then `model(batch)`; weights via `load_weights`.

The names below are imported when first used (PEP 562), so that `import model.choices` (what
the config validation needs) does not import torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {"build_model": "model.build", "Detections": "model.detections", "MaskRCNN": "model.maskrcnn",
            "StaticPart": "model.maskrcnn"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
