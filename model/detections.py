"""What the model returns in evaluation: fixed-size, padded detections per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Detections:
    """Up to D detections per image, valid rows first and sorted by descending score.

    Boxes are xyxy in the network-input frame (the resized image of `Batch.image_sizes`);
    the evaluator maps them back to original pixels with `Batch.scales`. `inclusive`: the model
    follows the reference's conventions (model.convention=reference), so the evaluator scales
    and pastes them as the reference's inclusive pixel boxes (train/evaluation.py).
    """

    boxes: torch.Tensor  # [B, D, 4] float32
    scores: torch.Tensor  # [B, D] float32; 0 past num_detections
    labels: torch.Tensor  # [B, D] int64 contiguous 1..K; 0 past num_detections
    mask_probs: torch.Tensor  # [B, D, M, M] float32 probabilities of the predicted class (M = 28)
    num_detections: torch.Tensor  # [B] int32
    inclusive: bool = False
