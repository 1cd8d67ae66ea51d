"""Shared test setup: make the repo root importable and skip `gpu` tests cleanly without CUDA."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (GPU-only path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
