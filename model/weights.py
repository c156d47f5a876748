"""Weight import: this trainer's checkpoints and state dicts, torchvision's COCO Mask R-CNN and
ResNet-50, and Detectron's MSRA R-50.pkl; the one place that tells weight files apart.

`read_weights(path)` reads a file once and says what it is (a `WeightsFile`: its kind, tensors,
and the config and categories a checkpoint carries); `load_weights(model, file, categories)`
puts it into a model. Every loader checks names and shapes: a mismatch is one sentence naming
the layer and the config key that sets its shape. The class-specific layers (box predictor
`cls_score` / `bbox_pred`, mask predictor `mask_fcn_logits`) are the exception when training
(`for_training=True`, fine-tuning): when the weights' categories are not the data's, they keep
their fresh reference initialization and the report lists them by name, as Detectron2 does;
for evaluation and prediction every parameter must come from the file. Keys the file has that
the model does not use are reported by name. Torch files are read with
`torch.load(weights_only=True)`, the pickle with an unpickler that builds nothing but
containers and numpy arrays: a pickle can run code.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from model.maskrcnn import MaskRCNN
from pipeline.coco_categories import COCO_CATEGORY_IDS, coco_categories

log = logging.getLogger(__name__)

BODY = "static_part.backbone.body."
# The layers whose rows are the classes (background first; bbox_pred has 4 rows per class).
CLASS_SPECIFIC = (
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.bias",
)
# Parameter name prefix -> the config key that sets its shape (first match wins).
SHAPE_KEYS = (
    (BODY, "model.backbone.width (and depth, norm)"),
    ("static_part.backbone.fpn.", "model.fpn_channels"),
    ("static_part.rpn_head.conv.", "model.fpn_channels"),
    ("static_part.rpn_head.", "model.rpn.aspect_ratios"),
    ("roi_heads.box_head.fc6.", "model.roi_heads.box_head_dim (and pooler_resolution, fpn_channels)"),
    ("roi_heads.box_", "model.roi_heads.box_head_dim"),
    ("roi_heads.mask_", "model.roi_heads.mask_head_channels"),
)
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
# What each kind of file was trained with, where the model's config must agree: the stride's
# place and the input normalization change no shape, so a mismatch would load silently.
MSRA = "Detectron R-50.pkl"
TORCHVISION_RESNET = "torchvision ResNet"
TORCHVISION_MASKRCNN = "torchvision Mask R-CNN"
CHECKPOINT = "trainer checkpoint"
STATE_DICT = "Mask R-CNN state dict"
_TRAINED_WITH = {
    MSRA: {"backbone.stride_in_1x1": True, "normalization": "bgr255"},
    TORCHVISION_RESNET: {"backbone.stride_in_1x1": False, "normalization": "rgb"},
    TORCHVISION_MASKRCNN: {"backbone.stride_in_1x1": False, "normalization": "rgb"},
}
# What a config for the file should also set, though other values load and train: torchvision's
# RPN head learned its own anchors and its heads its continuous boxes (reproducing its AP needs
# them; fine-tuning may change them).
_SUGGESTED = {TORCHVISION_MASKRCNN: {"convention": "torchvision"}}


class WeightsError(ValueError):
    """A weights file that cannot be loaded into this model; the message says why and what to do."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # our parameter/buffer names that were set
    unexpected: list[str] = field(default_factory=list)  # names in the file that we did not use
    fresh: list[str] = field(default_factory=list)  # class-specific names left at their initialization


@dataclass(frozen=True)
class WeightsFile:
    """One weights file, read once: what it is and what it holds."""

    path: Path
    kind: str  # MSRA | TORCHVISION_RESNET | TORCHVISION_MASKRCNN | CHECKPOINT | STATE_DICT
    tensors: Mapping[str, Any]  # names as in the file (numpy arrays for the pickle)
    config: Mapping[str, Any] | None = None  # a checkpoint's resolved run config
    categories: list[dict[str, Any]] | None = None  # what the class rows stand for, when the file says

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"

    @property
    def has_heads(self) -> bool:
        """Whether the file holds a whole detector (else only a backbone to train from)."""
        return self.kind in (TORCHVISION_MASKRCNN, CHECKPOINT, STATE_DICT)

    def trained_with(self) -> dict[str, Any]:
        """Model keys (under `model.`) whose values the weights need: the stride's place and the normalization."""
        if self.kind in _TRAINED_WITH:
            return dict(_TRAINED_WITH[self.kind])
        model = (self.config or {}).get("model", {})
        return {key: _lookup(model, key) for key in ("backbone.stride_in_1x1", "normalization") if _has(model, key)}

    def model_overrides(self) -> list[str]:
        """`KEY=VALUE` overrides that make a config fit these weights (for files that carry no config)."""
        wanted = {**self.trained_with(), **_SUGGESTED.get(self.kind, {})}
        return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in wanted.items()]

    def class_categories(self) -> list[dict[str, Any]] | None:
        """The categories of the class rows (manifest style: id, coco_id, name), if known or implied.

        torchvision's COCO model: COCO's 80; a file that only gives a class count: `class N`.
        """
        if self.categories is not None:
            return list(self.categories)
        if self.kind == TORCHVISION_MASKRCNN:
            return coco_categories()
        if self.kind in (CHECKPOINT, STATE_DICT) and CLASS_SPECIFIC[1] in self.tensors:
            rows = len(self.tensors[CLASS_SPECIFIC[1]])
            return [{"id": i, "coco_id": i, "name": f"class {i}"} for i in range(1, rows)]
        return None


def _lookup(mapping: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        mapping = mapping[part]
    return mapping


def _has(mapping: Mapping[str, Any], dotted: str) -> bool:
    try:
        _lookup(mapping, dotted)
    except (KeyError, TypeError):
        return False
    return True


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Detectron's pickles come from Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise WeightsError(
                f"{self.path} was not loaded: unpickling it would call {module}.{name}, so it could run code on "
                "this machine, where a weights pickle holds only numpy arrays (use the original Detectron R-50.pkl)"
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


def _check_trained_with(model: MaskRCNN, weights: WeightsFile) -> None:
    """The model's stride placement and normalization must be what the weights were trained with."""
    for key, wanted in weights.trained_with().items():
        have = _lookup(model.config, key)
        if have != wanted:
            shown = str(wanted).lower() if isinstance(wanted, bool) else wanted
            raise WeightsError(
                f"{weights} was trained with model.{key}={shown}, but the model is built with {have!r}; "
                f"set model.{key}={shown}"
            )


def shape_key(name: str) -> str:
    """The config key that sets the shape of parameter `name`."""
    return next((key for prefix, key in SHAPE_KEYS if name.startswith(prefix)), "the model section")


def _assign(model: MaskRCNN, values: Mapping[str, Tensor], source: str, unexpected: list[str]) -> LoadReport:
    """Copy `values` (our names) into the model, checking shapes; every name must exist."""
    own = model.state_dict()
    for name, value in values.items():
        if name not in own:
            raise WeightsError(f"{source}: the model has no {name}; set {shape_key(name)} to what the weights were trained with")
        if tuple(own[name].shape) != tuple(value.shape):
            raise WeightsError(
                f"{source}: {name} is {tuple(value.shape)} in the file but {tuple(own[name].shape)} in the model; "
                f"set {shape_key(name)} to what the weights were trained with"
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


def load_msra_r50(model: MaskRCNN, blobs: Mapping[str, np.ndarray], source: str = MSRA) -> LoadReport:
    """Detectron's MSRA ResNet blobs (R-50.pkl, BGR 0-255 input) into the backbone body.

    Caffe2's frozen norms are affine (scale `_bn_s`, shift `_bn_b`): they become weight and
    bias with mean 0 and variance 1 - eps, so the layer applies exactly the stored affine.
    """
    own = model.state_dict()
    values: dict[str, Tensor] = {}
    wanted = {}
    for key in own:
        if key.startswith(BODY) and not key.endswith("num_batches_tracked"):
            body_key = key[len(BODY) :]
            blob = caffe2_name(body_key)
            if blob is not None:
                wanted[key] = blob
    _require(list(wanted.values()), blobs, source, "blobs")
    for key, blob in wanted.items():
        values[key] = torch.from_numpy(np.ascontiguousarray(blobs[blob]))
    for key in own:
        if key.startswith(BODY) and key.endswith((".running_mean", ".running_var")):
            eps = model.get_submodule(key.rsplit(".", 1)[0]).eps
            stat = torch.zeros_like(own[key]) if key.endswith("mean") else torch.full_like(own[key], 1.0 - eps)
            values[key] = stat
    used = set(wanted.values())
    unexpected = [b for b in blobs if b not in used and not b.startswith("fc1000")]
    return _assign(model, values, source, unexpected)


def load_torchvision_resnet50(model: MaskRCNN, state_dict: Mapping[str, Tensor], source: str = TORCHVISION_RESNET) -> LoadReport:
    """torchvision's ImageNet ResNet (RGB, mean/std input) into the backbone body; `fc.*` is unused."""
    body_keys = [k[len(BODY) :] for k in model.state_dict() if k.startswith(BODY) and not k.endswith("num_batches_tracked")]
    _require(body_keys, state_dict, source, "keys")
    values = {BODY + k: state_dict[k] for k in body_keys}
    ignored = set(body_keys)
    unexpected = [k for k in state_dict if k not in ignored and not k.startswith("fc.") and "num_batches" not in k]
    return _assign(model, values, source, unexpected)


def load_torchvision_maskrcnn(
    model: MaskRCNN, state_dict: Mapping[str, Tensor], coco_ids: Sequence[int] = COCO_CATEGORY_IDS
) -> LoadReport:
    """torchvision's COCO `maskrcnn_resnet50_fpn` checkpoint into the whole model.

    Its class outputs are indexed by COCO category id (0 background, 91 rows); ours by the
    contiguous ids 1..K of the shard manifest. `coco_ids[c - 1]` is the COCO id of our class
    c (the default is COCO's 80 ids in increasing order); its rows are copied to ours.
    """
    values = _select_class_rows(_from_torchvision(state_dict), [0, *coco_ids])
    return _load_detector(model, values, TORCHVISION_MASKRCNN, keep_class_layers=True)


def _from_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's Mask R-CNN names -> ours."""
    renamed = {}
    for key, value in _upgrade_torchvision_names(state_dict).items():
        for old, new in _TORCHVISION_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    return renamed


def _select_class_rows(state: Mapping[str, Tensor], rows: Sequence[int]) -> dict[str, Tensor]:
    """`state` with the class-specific layers cut down to `rows` (background first), in that order."""
    index = torch.tensor(list(rows))
    per_class = {name: index for name in CLASS_SPECIFIC}
    for name in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"):
        per_class[name] = (index[:, None] * 4 + torch.arange(4)).flatten()  # 4 box deltas per class
    return {k: v[per_class[k]] if k in per_class else v for k, v in state.items()}


def _upgrade_torchvision_names(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The published checkpoint predates torchvision's Conv2dNormActivation: rename its old keys."""
    upgraded = {}
    for key, value in state_dict.items():
        key = re.sub(r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", key)
        key = re.sub(r"^roi_heads\.mask_head\.mask_fcn(\d)\.", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.", key)
        key = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(weight|bias)$", r"backbone.fpn.\1_blocks.\2.0.\3", key)
        upgraded[key] = value
    return upgraded


def _load_detector(model: MaskRCNN, values: Mapping[str, Tensor], source: str, keep_class_layers: bool) -> LoadReport:
    """A whole detector's state (our names) into the model; without `keep_class_layers` those stay fresh."""
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    fresh = [] if keep_class_layers else [k for k in CLASS_SPECIFIC if k in own]
    take = {k: values[k] for k in own if k in values and k not in fresh}
    missing = [k for k in own if k not in take and k not in fresh]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{source} lacks {missing[0]}{more}; set {shape_key(missing[0])} to what the weights were trained with")
    unexpected = [k for k in values if k not in set(own) and not k.endswith("num_batches_tracked")]
    report = _assign(model, take, source, unexpected)
    report.fresh = fresh
    return report


def load_failure(error: Exception) -> str:
    """What `torch.load(weights_only=True)` found wrong, in a few plain words.

    Never torch's advice to load with weights_only=False: that would run whatever code the file
    holds. A file that asks for a class or function while unpickling (os.system, or any object
    that is not a tensor) is named as what it is, a file that could run code, which was not loaded.
    """
    text = " ".join(str(error).split())
    wanted = re.search(r"GLOBAL ([\w.]+)", text)
    if wanted:
        return f"unpickling it would call {wanted.group(1)}, so it could run code on this machine; it was not loaded"
    if "failed finding central directory" in text:
        return "its zip archive ends early: the file is truncated"
    _, unpickler, detail = text.partition("WeightsUnpickler error:")
    sentences = (detail or text).split(" Check the documentation")[0].split(". ")
    plain = [s for s in sentences if "weights_only" not in s and "torch.load" not in s]
    return (plain[0] if plain else "it is not a pickle of tensors").strip().rstrip(".")[:200]


def read_weights(path: str | Path) -> WeightsFile:
    """Read a weights file and tell what it is, by content: a Caffe2 pickle, or a torch file holding
    a trainer checkpoint (any mapping with a `model` state dict, such as torchvision's reference
    trainer writes), this model's state dict, torchvision's Mask R-CNN, or a torchvision ResNet."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass a checkpoint, a state dict or R-50.pkl")
    if path.suffix == ".pkl":
        return WeightsFile(path, MSRA, read_caffe2_pickle(path))
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(
            f"{path} is not a loadable torch weights file ({load_failure(e)}); pass a state dict saved with torch.save"
        ) from e
    if not isinstance(saved, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    config = categories = None
    state = saved
    if isinstance(saved.get("model"), Mapping):
        state = saved["model"]
        config = saved.get("config") if isinstance(saved.get("config"), Mapping) else None
        categories = saved.get("categories")
    if any(k.startswith("static_part.") for k in state):
        return WeightsFile(path, CHECKPOINT if config is not None else STATE_DICT, state, config, categories)
    if any(k.startswith("roi_heads.") for k in state):
        return WeightsFile(path, TORCHVISION_MASKRCNN, state)
    if "layer1.0.conv1.weight" in state:
        return WeightsFile(path, TORCHVISION_RESNET, state)
    raise WeightsError(
        f"{path} is neither a Detectron .pkl nor a trainer checkpoint nor a torchvision ResNet / Mask R-CNN / "
        "this model's state dict"
    )


def load_weights(
    model: MaskRCNN,
    weights: WeightsFile | str | Path,
    categories: Sequence[Mapping[str, Any]] | None = None,
    *,
    for_training: bool = False,
) -> LoadReport:
    """Load any supported file into `model`, whose classes are `categories` (manifest style).

    `categories` None: the file's own (or COCO's). For training (fine-tuning), class-specific
    layers whose categories differ from the file's keep their initialization and are listed in
    the report and the log; a backbone-only file is a start. For evaluation and prediction
    (the default), every parameter must come from the file.
    """
    weights = weights if isinstance(weights, WeightsFile) else read_weights(weights)
    _check_trained_with(model, weights)
    if not weights.has_heads:
        if not for_training:
            raise WeightsError(f"{weights} holds a backbone only; pass a trained detector, or train from it with train.weights")
        if weights.kind == MSRA:
            return load_msra_r50(model, weights.tensors, str(weights))
        return load_torchvision_resnet50(model, weights.tensors, str(weights))
    values = dict(weights.tensors)
    if weights.kind == TORCHVISION_MASKRCNN:
        values = _from_torchvision(values)
    source_categories = weights.class_categories()
    target = list(categories) if categories is not None else source_categories
    rows = _class_rows(weights, source_categories, target)
    if rows is None and not for_training:
        raise WeightsError(
            f"{weights} detects {_names(source_categories)} but the data has {_names(target)}; "
            "use the data it was trained on, or fine-tune it on this data with train.weights"
        )
    if rows is not None:
        values = _select_class_rows(values, rows)
    report = _load_detector(model, values, str(weights), keep_class_layers=rows is not None)
    if report.fresh:
        log.warning(
            "%s: its %s are not the data's %s; these class-specific layers start fresh: %s",
            weights, _names(source_categories), _names(target), ", ".join(report.fresh),
        )
    log.info("%s: loaded %d tensors", weights, len(report.loaded))
    return report


def _class_rows(
    weights: WeightsFile, source: Sequence[Mapping[str, Any]] | None, target: Sequence[Mapping[str, Any]] | None
) -> list[int] | None:
    """Rows of the file's class outputs for background and each target category, or None if some have none.

    A category is the same when its COCO id and name are: torchvision's rows are COCO ids, ours
    the contiguous ids. A file that knows no names matches by count alone.
    """
    if target is None:
        return None
    if weights.categories is None and weights.kind != TORCHVISION_MASKRCNN:
        rows = len(weights.tensors.get(CLASS_SPECIFIC[1], ()))
        return list(range(rows)) if rows == len(target) + 1 else None
    row_of = {
        (int(c["coco_id"]), c["name"]): int(c["coco_id"] if weights.kind == TORCHVISION_MASKRCNN else c["id"])
        for c in source or ()
    }
    rows = [row_of.get((int(c["coco_id"]), c["name"])) for c in target]
    return None if None in rows else [0, *rows]


def _names(categories: Sequence[Mapping[str, Any]] | None) -> str:
    if not categories:
        return "no known categories"
    names = [str(c["name"]) for c in categories]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{len(names)} categories ({shown})"
