"""The MLPerf reference's own Python (maskrcnn-benchmark v3.1), loaded module by module as a test oracle.

The sources live beside the checkout at ../shared/mlperf_reference (its README says what they
are). Tests in this folder run the reference's functions beside ours on the same inputs; where
the folder is absent (a user's clone) they skip, saying why.

The package cannot be imported as a whole: its `__init__` files pull in the compiled extension
`maskrcnn_benchmark._C`, which is not there. So every package of the tree is registered empty
(with its real folder as `__path__`, so its modules import as they would), except `layers`,
whose `__init__` runs for real against a stand-in `_C` built from torchvision's operators:
- `nms`: torchvision's NMS on boxes whose x2, y2 have +1 added, which is the reference kernel's
  IoU of inclusive pixel boxes (width = x2 - x1 + 1);
- `roi_align_forward`: torchvision's `roi_align` with aligned=False, the same operator.
The code is written for older numpy: `np.float` is aliased to `float` (what it meant).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

REFERENCE_ROOT = Path(__file__).resolve().parents[3] / "shared" / "mlperf_reference"
PACKAGE = "maskrcnn_benchmark"
# Packages whose __init__ runs as written (the stand-in _C is enough for it).
IMPORTED_PACKAGES = ("layers",)


def reference_available() -> bool:
    return (REFERENCE_ROOT / PACKAGE / "structures" / "bounding_box.py").is_file()


SKIP_REASON = f"the MLPerf reference sources are not at {REFERENCE_ROOT} (../shared/mlperf_reference beside the checkout)"
requires_reference = pytest.mark.skipif(not reference_available(), reason=SKIP_REASON)


def _standin_extension() -> types.ModuleType:
    """`maskrcnn_benchmark._C` with torchvision's operators in place of the compiled kernels."""
    extension = types.ModuleType(f"{PACKAGE}._C")

    def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return torchvision.ops.nms(boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0]), scores, threshold)

    def roi_align_forward(features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
        return torchvision.ops.roi_align(
            features, rois, (pooled_height, pooled_width), spatial_scale, sampling_ratio, aligned=False
        )

    extension.nms = nms
    extension.roi_align_forward = roi_align_forward
    return extension


def _install() -> None:
    if PACKAGE in sys.modules:
        return
    if not hasattr(np, "float"):
        np.float = float  # numpy < 1.24's alias, used by the reference's anchor generator
    root = REFERENCE_ROOT / PACKAGE
    for folder in [root, *sorted(p.parent for p in root.rglob("__init__.py") if p.parent != root)]:
        name = ".".join([PACKAGE, *folder.relative_to(root).parts])
        if folder.name in IMPORTED_PACKAGES:
            continue
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    sys.modules[f"{PACKAGE}._C"] = _standin_extension()
    for name in IMPORTED_PACKAGES:
        importlib.import_module(f"{PACKAGE}.{name}")


def reference(module: str) -> types.ModuleType:
    """The reference's module `module` (e.g. "modeling.box_coder"); skips the test where the sources are absent."""
    if not reference_available():
        pytest.skip(SKIP_REASON)
    _install()
    return importlib.import_module(f"{PACKAGE}.{module}")
