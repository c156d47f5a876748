"""Mask R-CNN ResNet-50-FPN: `build_model(cfg.model)`, then `model(batch)`; weights via `load_weights`."""

from model.build import build_model
from model.detections import Detections
from model.maskrcnn import MaskRCNN, StaticPart

__all__ = ["build_model", "Detections", "MaskRCNN", "StaticPart"]
