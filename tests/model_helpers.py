"""Small builders shared by the model tests: configs and a Batch from explicit ground truth."""

from __future__ import annotations

import torch

from pipeline.batch import Batch
from train.config import load_config

TINY = [
    "model.backbone.depth=14",
    "model.backbone.width=16",
    "model.backbone.norm=gn",
    "model.backbone.freeze_at=0",
    "model.fpn_channels=32",
    "model.roi_heads.box_head_dim=64",
    "model.roi_heads.mask_head_channels=[32,32]",
    "model.rpn.pre_nms_top_n_train=300",
    "model.rpn.post_nms_top_n_train=200",
    "model.roi_heads.batch_size_per_image=64",
]


# The demo config shrunk to 64x80 images, batches of 2 and one thread: a train/main.py run in seconds.
TINY_RUN = [
    "data.min_size=64", "data.max_size=80", "data.buckets=[[64, 80], [80, 64]]", "data.dali_threads=1", "data.torch_workers=1",
    "data.backend=torch", "solver.ims_per_batch=2", "eval.ims_per_batch=2", "eval.num_workers=0",
    "train.checkpoint_every=100", "train.num_threads=1",
]


def model_config(*overrides: str):
    return load_config("configs/reference.yaml", list(overrides)).model


def batch_from(images: torch.Tensor, boxes: list[list[list[float]]], labels: list[list[int]], polygons) -> Batch:
    """Batch of images [B,3,H,W]; per image a list of boxes, labels and, per box, a list of polygons [[x, y], ...]."""
    b, _, h, w = images.shape
    max_gt = max(1, max(len(x) for x in boxes))
    max_polys = max(1, max(sum(len(p) for p in ps) for ps in polygons))
    max_verts = max(1, max(sum(len(poly) for p in ps for poly in p) for ps in polygons))
    gt = torch.zeros(b, max_gt, 4)
    gt_labels = torch.zeros(b, max_gt, dtype=torch.int64)
    verts = torch.zeros(b, max_verts, 2)
    polys = torch.tensor([-1, 0, 0], dtype=torch.int32).repeat(b, max_polys, 1)
    num_polys = torch.zeros(b, dtype=torch.int32)
    for i in range(b):
        if boxes[i]:
            gt[i, : len(boxes[i])] = torch.tensor(boxes[i])
            gt_labels[i, : len(labels[i])] = torch.tensor(labels[i])
        v = p = 0
        for instance, parts in enumerate(polygons[i]):
            for part in parts:
                verts[i, v : v + len(part)] = torch.tensor(part, dtype=torch.float32)
                polys[i, p] = torch.tensor([instance, v, v + len(part)])
                v, p = v + len(part), p + 1
        num_polys[i] = p
    return Batch(
        images=images.contiguous(memory_format=torch.channels_last),
        image_sizes=torch.tensor([[h, w]] * b, dtype=torch.int32),
        original_sizes=torch.tensor([[h, w]] * b, dtype=torch.int32),
        scales=torch.ones(b, 2),
        flipped=torch.zeros(b, dtype=torch.bool),
        image_ids=torch.arange(b),
        boxes=gt,
        labels=gt_labels,
        num_boxes=torch.tensor([len(x) for x in boxes], dtype=torch.int32),
        verts=verts,
        polys=polys,
        num_polys=num_polys,
    )


def random_checkpoint(folder, config, categories, seed: int = 0):
    """A trainer checkpoint (train/checkpoint.py) of a randomly initialized model of `config`
    for `categories` (manifest style): it carries its config and categories, as a real run's does."""
    from model import build_model
    from train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model(config.model, num_classes=len(categories) + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return save_checkpoint(folder, model=model, optimizer=optimizer, scaler=None, iteration=7, epoch=1,
                           loader_state=None, config=config, categories=list(categories))
