"""What every config key may hold: the one place for choices, ranges and element types.

`SCHEMA` maps each dotted key of configs/reference.yaml to a rule; `check_config` runs them all
(and the few rules that tie two keys together) once, when `train.config.load_config` builds a
config, so a bad value stops a tool in one sentence before anything is written. Choices that
belong to another folder (loader backends, normalizations, backbone depths and norms) are read
from there; the trainer's own choices are defined here and imported by the code that uses them.
A key the schema does not know yet is still type-checked against reference.yaml;
tests/test_config.py fails until every key has a rule.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from model.choices import BLOCKS_PER_STAGE, CONVENTIONS, NORMALIZATIONS, NORMS
from pipeline import BACKENDS as LOADER_BACKENDS, DECODE_DEVICES, bucket_problem

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("auto", "apex", "fused", "foreach", "plain")
WARMUP_METHODS = ("linear", "mlperf_linear")  # the reference scheduler's: relative, and absolute (NVIDIA's, the RCPs')
EVAL_BACKENDS = ("pycocotools", "faster")
MLPERF_DIVISIONS = ("closed", "open")
MLPERF_STATUSES = ("cloud", "onprem", "preview", "research")
FPN_LEVELS = 5  # P2-P6: one anchor size and stride per level


class Rule:
    """A check of one value: `coerce` returns the value to keep, or raises ValueError."""

    description = ""

    def coerce(self, value: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Choice(Rule):
    values: tuple[Any, ...]

    @property
    def description(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)

    def coerce(self, value: Any) -> Any:
        if isinstance(value, bool) or value not in self.values:
            raise ValueError
        return value


@dataclass(frozen=True)
class Number(Rule):
    """An int (`integer=True`) or a float within [low, high]; `open_low` excludes the low end."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    open_low: bool = False
    open_high: bool = False

    @property
    def description(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"{kind} in {left}{_show(self.low)}, {_show(self.high)}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.open_low else '>='} {_show(self.low)}"
        return kind

    def coerce(self, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError
        if self.integer:
            if not isinstance(value, int):
                raise ValueError
        else:
            # PyYAML reads 1e-4 (no dot) as a string; accept what float() reads, finite only.
            if not isinstance(value, (int, float, str)):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            raise ValueError
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            raise ValueError
        return value


@dataclass(frozen=True)
class Flag(Rule):
    description = "true or false"

    def coerce(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError
        return value


@dataclass(frozen=True)
class Text(Rule):
    non_empty: bool = False

    @property
    def description(self) -> str:
        return "a non-empty string" if self.non_empty else "a string (a path, or empty)"

    def coerce(self, value: Any) -> Any:
        if not isinstance(value, str) or (self.non_empty and not value):
            raise ValueError
        return value


@dataclass(frozen=True)
class ListOf(Rule):
    """A list of values that each pass `item`; `length` exact, or at least `min_length`; maybe increasing."""

    item: Rule
    length: int | None = None
    min_length: int = 0
    increasing: bool = False

    @property
    def description(self) -> str:
        size = f"{self.length} " if self.length is not None else ("" if not self.min_length else f"{self.min_length}+ ")
        order = "increasing " if self.increasing else ""
        return f"a list of {size}{order}values, each {self.item.description}"

    def coerce(self, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ValueError
        if (self.length is not None and len(value) != self.length) or len(value) < self.min_length:
            raise ValueError
        items = [self.item.coerce(v) for v in value]
        if self.increasing and any(b <= a for a, b in zip(items, items[1:])):
            raise ValueError
        return items


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


COUNT = Number(low=1, integer=True)
NON_NEGATIVE_INT = Number(low=0, integer=True)
FRACTION = Number(low=0.0, high=1.0)
POSITIVE_FRACTION = Number(low=0.0, high=1.0, open_low=True)
NON_NEGATIVE = Number(low=0.0)
POSITIVE = Number(low=0.0, open_low=True)

# Keys a config may no longer set, with what replaced them: an old config fails on them in one sentence.
RETIRED: dict[str, str] = {
    "data.num_threads": "set data.dali_threads (DALI's CPU threads) and data.torch_workers "
    "(the torch backend's DataLoader worker processes) instead",
    "model.rpn.anchor_generator": "set model.convention instead (reference, or torchvision: its anchors and "
    "continuous boxes together, for its COCO checkpoint)",
}

SCHEMA: dict[str, Rule] = {
    "seed": Number(low=0, high=2**32 - 1, integer=True),  # numpy and DALI take 32-bit seeds
    "output_dir": Text(non_empty=True),
    "data.train_shards": Text(),
    "data.val_shards": Text(),
    "data.val_annotations": Text(),
    "data.backend": Choice(LOADER_BACKENDS),
    "data.decode_device": Choice(DECODE_DEVICES),
    "data.dali_threads": COUNT,
    "data.torch_workers": NON_NEGATIVE_INT,  # 0: the training process reads and decodes
    "data.prefetch": NON_NEGATIVE_INT,  # 0 counts as 1 (pipeline/loader.py)
    "data.shuffle_buffer": NON_NEGATIVE_INT,
    "data.min_size": COUNT,
    "data.max_size": COUNT,
    "data.size_divisibility": COUNT,
    "data.static_shapes": Flag(),
    "data.buckets": ListOf(ListOf(COUNT, length=2), min_length=1),
    "data.flip_prob": FRACTION,
    "model.convention": Choice(CONVENTIONS),
    "model.normalization": Choice(tuple(NORMALIZATIONS)),
    "model.backbone.depth": Choice(tuple(sorted(BLOCKS_PER_STAGE))),
    "model.backbone.width": COUNT,
    "model.backbone.stride_in_1x1": Flag(),
    "model.backbone.norm": Choice(NORMS),
    "model.backbone.freeze_at": Number(low=0, high=5, integer=True),
    "model.fpn_channels": COUNT,
    "model.rpn.anchor_sizes": ListOf(COUNT, length=FPN_LEVELS, increasing=True),
    "model.rpn.anchor_strides": ListOf(COUNT, length=FPN_LEVELS, increasing=True),
    "model.rpn.aspect_ratios": ListOf(POSITIVE, min_length=1),
    "model.rpn.fg_iou": FRACTION,
    "model.rpn.bg_iou": FRACTION,
    "model.rpn.batch_size_per_image": COUNT,
    "model.rpn.positive_fraction": POSITIVE_FRACTION,
    "model.rpn.smooth_l1_beta": NON_NEGATIVE,
    "model.rpn.nms_thresh": POSITIVE_FRACTION,
    "model.rpn.pre_nms_top_n_train": COUNT,
    "model.rpn.post_nms_top_n_train": COUNT,
    "model.rpn.post_nms_per_batch": Flag(),
    "model.rpn.pre_nms_top_n_test": COUNT,
    "model.rpn.post_nms_top_n_test": COUNT,
    "model.rpn.min_size": NON_NEGATIVE,
    "model.rpn.straddle_thresh": Number(low=-1, integer=True),
    "model.roi_heads.fg_iou": FRACTION,
    "model.roi_heads.bg_iou": FRACTION,
    "model.roi_heads.batch_size_per_image": COUNT,
    "model.roi_heads.positive_fraction": POSITIVE_FRACTION,
    "model.roi_heads.bbox_reg_weights": ListOf(POSITIVE, length=4),
    "model.roi_heads.smooth_l1_beta": NON_NEGATIVE,
    "model.roi_heads.box_head_dim": COUNT,
    "model.roi_heads.pooler_resolution": COUNT,
    "model.roi_heads.pooler_sampling_ratio": NON_NEGATIVE_INT,
    "model.roi_heads.canonical_level": Number(low=2, high=5, integer=True),
    "model.roi_heads.canonical_scale": COUNT,
    "model.roi_heads.mask_pooler_resolution": COUNT,
    "model.roi_heads.mask_head_channels": ListOf(COUNT, min_length=1),
    "model.roi_heads.mask_resolution": COUNT,
    "model.roi_heads.score_thresh": FRACTION,
    "model.roi_heads.nms_thresh": POSITIVE_FRACTION,
    "model.roi_heads.detections_per_img": COUNT,
    "solver.ims_per_batch": COUNT,
    "solver.base_lr": POSITIVE,
    "solver.momentum": Number(low=0.0, high=1.0, open_high=True),
    "solver.weight_decay": NON_NEGATIVE,
    "solver.weight_decay_bias": NON_NEGATIVE,
    "solver.bias_lr_factor": NON_NEGATIVE,
    "solver.gamma": POSITIVE,
    "solver.steps": ListOf(NON_NEGATIVE_INT, increasing=True),
    "solver.max_iter": COUNT,
    "solver.warmup_factor": FRACTION,
    "solver.warmup_iters": NON_NEGATIVE_INT,
    "solver.warmup_method": Choice(WARMUP_METHODS),
    "solver.optimizer": Choice(OPTIMIZERS),
    "train.weights": Text(),
    "train.device": Choice(DEVICES),
    "train.precision": Choice(("auto", *PRECISIONS)),
    "train.cuda_graphs": Flag(),
    "train.checkpoint_every": NON_NEGATIVE_INT,
    "train.keep_checkpoints": NON_NEGATIVE_INT,  # 0 keeps all
    "train.resume": Text(),
    "train.loss_readback_every": COUNT,
    "train.max_nonfinite_in_a_row": COUNT,
    "train.max_epochs": COUNT,
    "train.collective_timeout_s": NON_NEGATIVE,  # 0: torch's defaults, no watch
    "train.deterministic": Flag(),
    "train.num_threads": NON_NEGATIVE_INT,
    "train.trace": Text(),  # "": no trace
    "train.trace_iters": ListOf(COUNT, length=2, increasing=True),  # [first, last): iterations first .. last - 1
    "train.mlperf.org": Text(non_empty=True),
    "train.mlperf.platform": Text(non_empty=True),
    "train.mlperf.division": Choice(MLPERF_DIVISIONS),
    "train.mlperf.status": Choice(MLPERF_STATUSES),
    "train.mlperf.cache_clear": Flag(),
    "eval.ims_per_batch": COUNT,
    "eval.every_epochs": NON_NEGATIVE_INT,  # 0: no evaluation
    "eval.asynchronous": Flag(),
    "eval.num_workers": NON_NEGATIVE_INT,
    "eval.scoring_workers": NON_NEGATIVE_INT,  # 0: one per CPU
    "eval.backend": Choice(EVAL_BACKENDS),
    "eval.box_ap_target": FRACTION,
    "eval.mask_ap_target": FRACTION,
}


@dataclass(frozen=True)
class Relation:
    """A rule over two keys: `holds(a, b)` must be true; `says` completes '{key} must ...'."""

    key: str
    other: str
    holds: Callable[[Any, Any], bool]
    says: str


RELATIONS = (
    Relation("data.min_size", "data.max_size", lambda a, b: a <= b, "be at most data.max_size"),
    Relation("model.rpn.bg_iou", "model.rpn.fg_iou", lambda a, b: a <= b, "be at most model.rpn.fg_iou"),
    Relation("model.roi_heads.bg_iou", "model.roi_heads.fg_iou", lambda a, b: a <= b, "be at most model.roi_heads.fg_iou"),
    Relation(
        "model.roi_heads.mask_resolution", "model.roi_heads.mask_pooler_resolution", lambda a, b: a == 2 * b,
        "be twice model.roi_heads.mask_pooler_resolution (the mask head's deconvolution doubles it)",
    ),
)


def check_buckets(values: Mapping[str, Any]) -> str | None:
    """data.buckets against the sizes it must hold (pipeline/batch.py's rule), when static shapes use them."""
    keys = ("data.static_shapes", "data.min_size", "data.max_size", "data.size_divisibility", "data.buckets")
    if not all(key in values for key in keys) or not values["data.static_shapes"]:
        return None
    return bucket_problem(*(values[key] for key in keys[1:]))


def cli_type(rule: Rule) -> Callable[[str], Any]:
    """An argparse `type` that holds a command-line value to `rule`, so a tool's flags and the config
    keys share one definition of each range; argparse turns a refusal into its one-line usage error."""

    def parse(text: str) -> Any:
        try:
            value = int(text) if isinstance(rule, Number) and rule.integer else text
            return rule.coerce(value)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule.description}") from None

    return parse


def check_value(key: str, value: Any) -> tuple[Any, str | None]:
    """(the value to keep, None) or (value, what `key` must be) for a key the schema knows."""
    rule = SCHEMA[key]
    try:
        return rule.coerce(value), None
    except (ValueError, TypeError):
        return value, rule.description


def check_relations(values: Mapping[str, Any]) -> Sequence[tuple[Relation, Any, Any]]:
    """The relations that fail, with both values; keys missing from `values` are skipped."""
    return [
        (r, values[r.key], values[r.other])
        for r in RELATIONS
        if r.key in values and r.other in values and not r.holds(values[r.key], values[r.other])
    ]
