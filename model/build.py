"""The one place where the `model:` config section becomes modules and plain numbers, and where
a model gets its weights (`build_model_with_weights`; model/weights.py tells the file formats apart)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from model.backbone import build_backbone
from model.maskrcnn import MaskRCNN, StaticPart
from model.normalization import InputNormalization, normalization
from model.pooler import MultiLevelRoIAlign
from model.roi_heads import RoIHeads, init_reference_heads
from model.rpn import Anchors, RegionProposals
from model.weights import WeightsFile, load_weights
from pipeline.coco_categories import COCO_CATEGORY_IDS

if TYPE_CHECKING:  # train/config.py imports model/ (through its schema)
    from train.config import Config

# The class count (categories + background) is the data's: the trainer takes it from the shards'
# manifest, the tools from the checkpoint. COCO's when nothing says otherwise.
DEFAULT_NUM_CLASSES = len(COCO_CATEGORY_IDS) + 1
TORCHVISION_FROZEN_BN_EPS = 1e-5  # torchvision's FrozenBatchNorm2d default (the reference's has none)


def build_model(model_cfg: Config, num_classes: int = DEFAULT_NUM_CLASSES) -> MaskRCNN:
    """Mask R-CNN from the `model:` config section for `num_classes` classes (K categories + background)."""
    cfg = {**model_cfg.to_dict(), "num_classes": num_classes}
    bb, rpn, roi = cfg["backbone"], cfg["rpn"], cfg["roi_heads"]
    backbone = build_backbone(
        bb["depth"], bb["width"], bb["stride_in_1x1"], bb["norm"], bb["freeze_at"], cfg["fpn_channels"],
        frozen_bn_eps=0.0 if cfg["convention"] == "reference" else TORCHVISION_FROZEN_BN_EPS,
    )
    strides = tuple(rpn["anchor_strides"])
    anchors = Anchors(tuple(rpn["anchor_sizes"]), tuple(rpn["aspect_ratios"]), strides, cfg["convention"])
    inclusive = cfg["convention"] == "reference"  # the reference's inclusive pixel boxes where its operators take them
    normalize = InputNormalization(normalization(cfg["normalization"]))
    static_part = StaticPart(normalize, backbone, RPNHead(cfg["fpn_channels"], anchors.num_per_location()))
    proposals = RegionProposals(
        anchors,
        fg_iou=rpn["fg_iou"],
        bg_iou=rpn["bg_iou"],
        batch_size_per_image=rpn["batch_size_per_image"],
        positive_fraction=rpn["positive_fraction"],
        smooth_l1_beta=rpn["smooth_l1_beta"],
        nms_thresh=rpn["nms_thresh"],
        pre_nms_top_n={"training": rpn["pre_nms_top_n_train"], "testing": rpn["pre_nms_top_n_test"]},
        post_nms_top_n={"training": rpn["post_nms_top_n_train"], "testing": rpn["post_nms_top_n_test"]},
        post_nms_per_batch=rpn["post_nms_per_batch"],
        min_size=rpn["min_size"],
        straddle_thresh=rpn["straddle_thresh"],
        inclusive=inclusive,
    )
    box_strides = strides[:-1]  # RoIs pool from P2-P5
    pool_args = dict(canonical_scale=roi["canonical_scale"], canonical_level=roi["canonical_level"], inclusive=inclusive)
    resolution = roi["pooler_resolution"]
    box_head = TwoMLPHead(cfg["fpn_channels"] * resolution**2, roi["box_head_dim"])
    box_predictor = FastRCNNPredictor(roi["box_head_dim"], cfg["num_classes"])
    mask_channels = roi["mask_head_channels"]
    mask_predictor = MaskRCNNPredictor(mask_channels[-1], mask_channels[-1], cfg["num_classes"])
    init_reference_heads(box_head, box_predictor, mask_predictor)
    roi_heads = RoIHeads(
        box_pool=MultiLevelRoIAlign(resolution, roi["pooler_sampling_ratio"], box_strides, **pool_args),
        box_head=box_head,
        box_predictor=box_predictor,
        mask_pool=MultiLevelRoIAlign(
            roi["mask_pooler_resolution"], roi["pooler_sampling_ratio"], box_strides, **pool_args
        ),
        mask_head=MaskRCNNHeads(cfg["fpn_channels"], mask_channels, dilation=1),
        mask_predictor=mask_predictor,
        fg_iou=roi["fg_iou"],
        bg_iou=roi["bg_iou"],
        batch_size_per_image=roi["batch_size_per_image"],
        positive_fraction=roi["positive_fraction"],
        bbox_reg_weights=tuple(roi["bbox_reg_weights"]),
        smooth_l1_beta=roi["smooth_l1_beta"],
        mask_resolution=roi["mask_resolution"],
        score_thresh=roi["score_thresh"],
        nms_thresh=roi["nms_thresh"],
        detections_per_img=roi["detections_per_img"],
        inclusive=inclusive,
    )
    return MaskRCNN(static_part, proposals, roi_heads, cfg)


def build_model_with_weights(
    model_cfg: Config,
    categories: Sequence[Mapping[str, Any]],
    weights: WeightsFile | str | Path | None,
    device: torch.device,
    *,
    for_training: bool = False,
) -> MaskRCNN:
    """The model of `model_cfg` for `categories` (plus background), on `device`, in channels_last.

    `weights` is any file model/weights.py reads. For training, it is optional (None: the
    reference initialization) and fine-tuning onto other categories starts the class-specific
    layers fresh (the log names them). Otherwise every parameter must come from it, and the model
    is in eval mode; a file that does not fit raises WeightsError in one sentence naming the
    layer and the config key (tools read the config from the checkpoint, so that happens only
    when the user overrides it).
    """
    model = build_model(model_cfg, num_classes=len(categories) + 1)
    if weights or not for_training:
        load_weights(model, weights, categories, for_training=for_training)
    model = model.to(device).to(memory_format=torch.channels_last)
    return model if for_training else model.eval()
