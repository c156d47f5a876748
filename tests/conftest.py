"""Shared pytest configuration: GPU tests skip cleanly on machines without CUDA, and a test that
runs a command line in-process (which configures logging onto that test's captured stdout)
leaves the root logger as it found it.

Session fixtures with shared test data (synthetic COCO set, train and val shards) live in
tests/fixtures.py, the tiny reference training runs in tests/train_runs.py; see their docstrings.
"""

import logging

import pytest
import torch

from fixtures import synthetic_coco, train_shards, val_shards  # noqa: F401  (session fixtures shared by all test modules)
from train_runs import reference_run, reference_runs  # noqa: F401  (the tiny reference training runs, made once per session)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """`train.main.setup_logging` binds the root logger to the current stdout, which pytest closes
    after the test: later log records would end in 'Logging error' tracebacks on stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
