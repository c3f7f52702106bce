"""The kind end-to-end run (tests/e2e/kind/run.sh), where Docker and kind are available.

It builds images and creates a cluster, so it needs a Docker engine and `kind`; on machines
without them (CI here) it skips and says which one is missing."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from helpers import ROOT


def _missing() -> str | None:
    for tool in ("docker", "kind", "kubectl", "helm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=30)
    if info.returncode != 0:
        return "docker cannot reach a Docker engine (docker info failed)"
    return None


def test_kind_end_to_end():
    reason = _missing()
    if reason:
        pytest.skip(f"kind e2e needs Docker and kind: {reason}; run `make e2e-kind` where they are")
    done = subprocess.run(
        ["bash", "tests/e2e/kind/run.sh"], cwd=ROOT, capture_output=True, text=True,
        timeout=3600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
