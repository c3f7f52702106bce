"""Every benchmark script that can run here runs in a tiny mode, so none rots between the runs
that produce bench/results/ (the speed numbers themselves are never asserted).

bench/kernels.py and bench/kernel_tiles.py measure Triton kernels on an NVIDIA GPU and have no
CPU mode; they are run on the device machine (docs/kernels.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from envtest import assets_dir
from helpers import ROOT


def _run(script: str, *args: str, timeout: float = 600) -> dict:
    output = args[args.index("--output") + 1]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(open(output).read())


@pytest.mark.parametrize("server", ["kmock", "real"])
def test_operator_scale_tiny(tmp_path, server):
    if server == "real" and assets_dir() is None:
        pytest.skip("the real-API-server mode needs KUBEBUILDER_ASSETS (see tests/envtest.py)")
    out = tmp_path / "operator_scale.json"
    result = _run(
        "operator_scale.py", "--counts", "2", "--api-server", server, "--output", str(out)
    )
    (row,) = result["results"]
    assert row["api_server"] == server and row["deployments"] == 2
    assert row["operator_object_writes"] >= 2 * row["objects_per_deployment"]
    assert row["ratio"] > 0 and row["operator_peak_rss_mb"] > 0
    assert "CPU only" in result["device"]


def test_router_tiny(tmp_path):
    out = tmp_path / "router.json"
    result = _run(
        "router.py",
        "--seconds", "0.5", "--engines", "1", "--concurrency", "2", "--output", str(out),
    )  # fmt: skip
    assert result["results"], result
    assert "device" in result


def test_kv_tiny(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "kv.json"
    result = _run("kv.py", "--quick", "--skip-offload", "--output", str(out))
    assert result["tcp"]["fraction_of_raw"] > 0
    assert "device" in result


def test_router_faults_tiny(tmp_path):
    out = tmp_path / "router_faults.json"
    result = _run("router_faults.py", "--tiny", "--output", str(out))
    scenarios = result["scenarios"]
    assert set(scenarios) == {
        "idle_gaps", "kill_decode", "kill_prefill", "sigstop_decode", "slowloris"
    }  # fmt: skip
    assert all(row["requests"] > 0 for name, row in scenarios.items() if name != "slowloris")
    assert scenarios["slowloris"]["normal_requests"]["requests"] > 0
    assert "device" in result
