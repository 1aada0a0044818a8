"""GPU tests: every test here is marked `gpu` and skipped on a machine without CUDA.

Triton must compile here, not interpret: with TRITON_INTERPRET=1 in the environment the kernels would
silently run on the CPU, so the tests skip instead.
"""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need compiled Triton kernels")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")
