"""Shared test setup: repo root importable, one CPU thread, and `gpu` tests skipped cleanly without CUDA.

One thread: the tests' tensors are tiny, several tests run subprocesses (torchrun ranks), and on a
2-core machine OpenMP threads spinning against each other made tiny steps up to 100x slower. The
env var is inherited by those subprocesses; fixed thread counts also keep fp32 sums reproducible.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (GPU-only path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
