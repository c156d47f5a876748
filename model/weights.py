"""Weight import: Detectron's MSRA R-50.pkl, torchvision's ResNet-50 and its COCO Mask R-CNN.

Every loader checks names and shapes and raises `WeightsError` naming what is missing; keys
the file has that the model does not use are returned (and logged) by name. Torch files are
read with `torch.load(weights_only=True)`, the pickle with an unpickler that builds nothing
but containers and numpy arrays: a pickle can run code.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from model.maskrcnn import MaskRCNN
from pipeline.coco_categories import COCO_CATEGORY_IDS

log = logging.getLogger(__name__)

BODY = "static_part.backbone.body."
# The numpy pieces a pickled array needs, under numpy 1 and numpy 2 module names.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
}
_TORCHVISION_PREFIXES = {"backbone.": "static_part.backbone.", "rpn.head.": "static_part.rpn_head."}


class WeightsError(ValueError):
    """A weights file that cannot be loaded into this model; the message says why and what to do."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # our parameter/buffer names that were set
    unexpected: list[str] = field(default_factory=list)  # names in the file that we did not use


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Detectron's pickles come from Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise WeightsError(
                f"{self.path} asks to run {module}.{name} while unpickling; refusing it, since a weights "
                "pickle should hold only numpy arrays (use the original Detectron R-50.pkl)"
            )
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_caffe2_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """Blob name -> array from a Detectron/Caffe2 pickle (a dict of blobs, maybe under 'blobs')."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = _ArraysOnlyUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not a readable Caffe2 weights pickle ({e}); download R-50.pkl again") from e
    if isinstance(data, dict) and isinstance(data.get("blobs"), dict):
        data = data["blobs"]
    if not isinstance(data, dict):
        raise WeightsError(f"{path} does not hold a dict of named blobs; is it a Detectron weights pickle?")
    blobs = {k: v for k, v in data.items() if isinstance(v, np.ndarray) and v.dtype != object}
    return blobs


def caffe2_name(body_key: str) -> str | None:
    """Our ResNet body key (e.g. 'layer1.0.bn2.weight') -> its Caffe2 blob ('res2_0_branch2b_bn_s').

    None for running statistics, which Caffe2's affine-channel layers do not have.
    """
    m = re.fullmatch(r"(conv1|bn1)\.(weight|bias)", body_key)
    if m:
        return "conv1_w" if m[1] == "conv1" else f"res_conv1_bn_{'s' if m[2] == 'weight' else 'b'}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(weight|bias)", body_key)
    if not m:
        return None
    stage, block, kind, index, param = int(m[1]) + 1, m[2], m[3], int(m[4]), m[5]
    branch = "branch1" if kind == "downsample." else "branch2" + "abc"[index - 1]
    is_norm = kind == "bn" or (kind == "downsample." and index == 1)
    suffix = ("_bn_s" if param == "weight" else "_bn_b") if is_norm else "_w"
    return f"res{stage}_{block}_{branch}{suffix}"


def _check_stride(model: MaskRCNN, want_in_1x1: bool, source: str) -> None:
    if model.config["backbone"]["stride_in_1x1"] != want_in_1x1:
        raise WeightsError(
            f"{source} weights put the stride in the {'1x1' if want_in_1x1 else '3x3'} conv; build the model "
            f"with model.backbone.stride_in_1x1={str(want_in_1x1).lower()}"
        )


def _assign(model: MaskRCNN, values: Mapping[str, Tensor], source: str, unexpected: list[str]) -> LoadReport:
    """Copy `values` (our names) into the model, checking shapes; every name must exist."""
    own = model.state_dict()
    for name, value in values.items():
        if name not in own:
            raise WeightsError(f"{source}: the model has no {name}; was it built with a different config?")
        if tuple(own[name].shape) != tuple(value.shape):
            raise WeightsError(
                f"{source}: {name} has shape {tuple(value.shape)} in the file but {tuple(own[name].shape)} in the "
                "model; build the model with the matching depth/width/num_classes"
            )
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in values.items()}})
    if unexpected:
        log.warning("%s: %d unused entries: %s", source, len(unexpected), ", ".join(unexpected))
    return LoadReport(sorted(values), sorted(unexpected))


def _require(names: Sequence[str], available: Mapping, source: str, what: str) -> None:
    missing = [n for n in names if n not in available]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise WeightsError(f"{source} lacks {what} {shown}; is it the right file for this backbone?")


def load_msra_r50_pkl(model: MaskRCNN, path: str | Path) -> LoadReport:
    """Detectron's MSRA ResNet (R-50.pkl, BGR 0-255 input) into the backbone body.

    Caffe2's frozen norms are affine (scale `_bn_s`, shift `_bn_b`): they become weight and
    bias with mean 0 and variance 1 - eps, so the layer applies exactly the stored affine.
    """
    _check_stride(model, True, f"MSRA {path}")
    blobs = read_caffe2_pickle(path)
    own = model.state_dict()
    values: dict[str, Tensor] = {}
    wanted = {}
    for key in own:
        if key.startswith(BODY) and not key.endswith("num_batches_tracked"):
            body_key = key[len(BODY) :]
            blob = caffe2_name(body_key)
            if blob is not None:
                wanted[key] = blob
    _require(list(wanted.values()), blobs, f"MSRA {path}", "blobs")
    for key, blob in wanted.items():
        values[key] = torch.from_numpy(np.ascontiguousarray(blobs[blob]))
    for key in own:
        if key.startswith(BODY) and key.endswith((".running_mean", ".running_var")):
            eps = model.get_submodule(key.rsplit(".", 1)[0]).eps
            stat = torch.zeros_like(own[key]) if key.endswith("mean") else torch.full_like(own[key], 1.0 - eps)
            values[key] = stat
    used = set(wanted.values())
    unexpected = [b for b in blobs if b not in used and not b.startswith("fc1000")]
    return _assign(model, values, f"MSRA {path}", unexpected)


def load_torchvision_resnet50(model: MaskRCNN, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """torchvision's ImageNet ResNet (RGB, mean/std input) into the backbone body; `fc.*` is unused."""
    _check_stride(model, False, "torchvision ResNet")
    body_keys = [k[len(BODY) :] for k in model.state_dict() if k.startswith(BODY) and not k.endswith("num_batches_tracked")]
    _require(body_keys, state_dict, "the torchvision ResNet state dict", "keys")
    values = {BODY + k: state_dict[k] for k in body_keys}
    ignored = set(body_keys)
    unexpected = [k for k in state_dict if k not in ignored and not k.startswith("fc.") and "num_batches" not in k]
    return _assign(model, values, "torchvision ResNet", unexpected)


def load_torchvision_maskrcnn(
    model: MaskRCNN, state_dict: Mapping[str, Tensor], coco_ids: Sequence[int] = COCO_CATEGORY_IDS
) -> LoadReport:
    """torchvision's COCO `maskrcnn_resnet50_fpn` checkpoint into the whole model.

    Its class outputs are indexed by COCO category id (0 background, 91 rows); ours by the
    contiguous ids 1..K of the shard manifest. `coco_ids[c - 1]` is the COCO id of our class
    c (the default is COCO's 80 ids in increasing order); its rows are copied to ours.
    """
    _check_stride(model, False, "torchvision Mask R-CNN")
    if model.config["num_classes"] != len(coco_ids) + 1:
        raise WeightsError(
            f"the model has {model.config['num_classes']} classes but {len(coco_ids)} COCO ids map to it; "
            "build it with num_classes = categories + 1"
        )
    rows = torch.tensor([0, *coco_ids])
    class_rows = {
        "roi_heads.box_predictor.cls_score.weight": rows,
        "roi_heads.box_predictor.cls_score.bias": rows,
        "roi_heads.box_predictor.bbox_pred.weight": (rows[:, None] * 4 + torch.arange(4)).flatten(),
        "roi_heads.box_predictor.bbox_pred.bias": (rows[:, None] * 4 + torch.arange(4)).flatten(),
        "roi_heads.mask_predictor.mask_fcn_logits.weight": rows,
        "roi_heads.mask_predictor.mask_fcn_logits.bias": rows,
    }
    renamed = {}
    for key, value in _upgrade_torchvision_names(state_dict).items():
        for old, new in _TORCHVISION_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value[class_rows[key]] if key in class_rows else value
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    _require(own, renamed, "the torchvision Mask R-CNN state dict", "keys")
    unexpected = [k for k in renamed if k not in set(own) and not k.endswith("num_batches_tracked")]
    return _assign(model, {k: renamed[k] for k in own}, "torchvision Mask R-CNN", unexpected)


def _upgrade_torchvision_names(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The published checkpoint predates torchvision's Conv2dNormActivation: rename its old keys."""
    upgraded = {}
    for key, value in state_dict.items():
        key = re.sub(r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", key)
        key = re.sub(r"^roi_heads\.mask_head\.mask_fcn(\d)\.", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.", key)
        key = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(weight|bias)$", r"backbone.fpn.\1_blocks.\2.0.\3", key)
        upgraded[key] = value
    return upgraded


def load_weights(model: MaskRCNN, path: str | Path, coco_ids: Sequence[int] = COCO_CATEGORY_IDS) -> LoadReport:
    """Load any supported file, told apart by content: a Caffe2 `.pkl`, or a torch state dict of
    a torchvision ResNet, a torchvision Mask R-CNN, or this model."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check train.weights")
    if path.suffix == ".pkl":
        return load_msra_r50_pkl(model, path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(
            f"{path} is not a loadable torch weights file ({e}); pass a state dict saved with torch.save"
        ) from e
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if any(k.startswith("static_part.") for k in state_dict):
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing:
            raise WeightsError(f"{path} lacks {', '.join(missing[:8])}; was it saved from a model with another config?")
        return LoadReport(sorted(state_dict), sorted(unexpected))
    if any(k.startswith("roi_heads.") for k in state_dict):
        return load_torchvision_maskrcnn(model, state_dict, coco_ids)
    if "layer1.0.conv1.weight" in state_dict:
        return load_torchvision_resnet50(model, state_dict)
    raise WeightsError(
        f"{path} is neither a Detectron .pkl nor a torchvision ResNet / Mask R-CNN / this model's state dict"
    )
