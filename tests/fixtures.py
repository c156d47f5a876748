"""Session-wide test data shared by every test module (registered in tests/conftest.py).

- `synthetic_coco`: a small synthetic COCO set, 24 train + 12 val images of about 160x200
  (pipeline/synthetic_coco.py, seed 0), as a `SyntheticCoco` with `.root`, `.train_images`,
  `.train_json`, `.val_images`, `.val_json`, and the image ids `.train_ids`, `.val_ids` (sorted).
- `train_shards`: a shard folder made from its train split with `--mode train`, 4 samples
  per shard (several shards per orientation group).
- `val_shards`: the same for the val split with `--mode eval`.

All of it is generated once per test session under pytest's temporary folder, in seconds.
Treat it as read-only: a test that needs to change data copies it first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.sharding import shard_coco
from pipeline.synthetic_coco import make_synthetic_coco

SMALL_IMAGE_SIZE = (160, 200)
SAMPLES_PER_SHARD = 4


@dataclass(frozen=True)
class SyntheticCoco:
    root: Path
    train_images: Path
    train_json: Path
    val_images: Path
    val_json: Path
    train_ids: tuple[int, ...]
    val_ids: tuple[int, ...]


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCoco:
    root = tmp_path_factory.mktemp("synthetic_coco")
    train_json = make_synthetic_coco(root, "train", 24, seed=0, image_size=SMALL_IMAGE_SIZE)
    val_json = make_synthetic_coco(root, "val", 12, seed=0, image_size=SMALL_IMAGE_SIZE)
    return SyntheticCoco(
        root=root,
        train_images=root / "train2017",
        train_json=train_json,
        val_images=root / "val2017",
        val_json=val_json,
        train_ids=_image_ids(train_json),
        val_ids=_image_ids(val_json),
    )


def _image_ids(annotations: Path) -> tuple[int, ...]:
    return tuple(sorted(image["id"] for image in json.loads(annotations.read_text())["images"]))


@pytest.fixture(scope="session")
def train_shards(synthetic_coco: SyntheticCoco, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_shards")
    shard_coco(synthetic_coco.train_images, synthetic_coco.train_json, out, mode="train",
               samples_per_shard=SAMPLES_PER_SHARD, seed=0)
    return out


@pytest.fixture(scope="session")
def val_shards(synthetic_coco: SyntheticCoco, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("val_shards")
    shard_coco(synthetic_coco.val_images, synthetic_coco.val_json, out, mode="eval",
               samples_per_shard=SAMPLES_PER_SHARD, seed=0)
    return out
