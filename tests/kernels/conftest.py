"""Kernel tests run on an NVIDIA GPU when one is present, else on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set here before any kernel module is imported).

ASCEND_KERNELS_DEVICE=cpu forces the interpreter on a GPU machine; =cuda insists on a GPU.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch", reason="kernel tests need the 'kernels' extra (torch, triton)")

_wanted = os.environ.get("ASCEND_KERNELS_DEVICE", "")
DEVICE = _wanted or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
elif DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("ASCEND_KERNELS_DEVICE=cuda but torch sees no CUDA device")

pytest.importorskip("triton", reason="kernel tests need the 'kernels' extra (torch, triton)")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_report_header() -> str:
    return f"ascend_kernels tests on {DEVICE}" + (
        " (Triton interpreter)" if DEVICE == "cpu" else ""
    )
