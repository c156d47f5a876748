"""Shared pytest configuration: GPU tests skip cleanly on machines without CUDA.

Session fixtures with shared test data (synthetic COCO set, train and val shards) live in
tests/fixtures.py; see its docstring for what each one holds.
"""

import pytest
import torch

from fixtures import synthetic_coco, train_shards, val_shards  # noqa: F401  (session fixtures shared by all test modules)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
