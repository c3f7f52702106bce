"""Every benchmark script runs in a tiny mode, so none rots between the runs that produce
bench/results/ (the speed numbers themselves are never asserted). The kernel benchmarks'
tiny mode runs toy shapes on the CPU under Triton's interpreter; their real runs need an
NVIDIA GPU (docs/kernels.md). The tiny modes of bench/vllm_serve.py and bench/kv_decision.py
(they start a real vLLM engine) are in tests/realvllm."""

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
        "--seconds", "0.5", "--rounds", "1", "--engines", "1", "--concurrency", "2",
        "--output", str(out),
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


def test_kernels_tiny(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    result = _run("kernels.py", "--tiny", "--output", str(out))
    kernels = {r["kernel"] for r in result["results"]}
    assert {"causal_conv1d_prefill", "causal_conv1d_update", "gdn_chunk_prefill",
            "gdn_decode", "reshape_and_cache", "moe_unpermute"} <= kernels  # fmt: skip
    shapes = [r["shape"] for r in result["results"] if r["kernel"] == "causal_conv1d_prefill"]
    assert any(s.endswith("no bias") for s in shapes) and any(s.endswith(", bias") for s in shapes)
    gdn = next(r for r in result["results"] if r["kernel"] == "gdn_chunk_prefill")
    assert gdn["max_abs_error_vs_reference"] < 5e-2
    assert result["tiny"] and "Triton interpreter" in result["device"]


def test_kernel_tiles_tiny(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path / "kernel_tiles.json"
    result = _run("kernel_tiles.py", "--tiny", "--output", str(out))
    gdn = [r for r in result["results"] if r["kernel"].startswith("gdn_prefill")]
    others = [r for r in result["results"] if r not in gdn]
    assert len(others) == 3  # one configuration of each memory-bound sweep
    # GDN prefill: fp32 and 16-bit products, both close to the IEEE fp32 reference
    assert {r["config"]["LOW_PRECISION"] for r in gdn} == {False, True}
    assert all(r["correct"] for r in result["results"])


def test_sim_published_tiny(tmp_path):
    out = tmp_path / "sim_published.json"
    result = _run("sim_published.py", "--tiny", "--output", str(out))
    assert [r["requests"] for r in result["results"]] == [24, 24, 1, 1]
    for row in result["results"]:
        compared = [k for k in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms") if k in row]
        assert "mean_ttft_ms" in compared
        for key in compared:
            assert row[key]["simulated"] > 0 and row[key]["published"] > 0
            assert row[key]["calibrated"]["simulated"] > 0
    # The calibration makes its anchor row land on its published TTFT, and slows prefill.
    assert 0 < result["calibrated_compute_efficiency"] < 1
    anchor = next(r for r in result["results"] if r["setup"] == result["calibrated_on"])
    assert anchor["mean_ttft_ms"]["calibrated"]["ratio"] == pytest.approx(1, abs=0.01)
    assert anchor["mean_ttft_ms"]["ratio"] < anchor["mean_ttft_ms"]["calibrated"]["ratio"]
    assert "no NPU" in result["device"]


def test_sim_scale_tiny(tmp_path):
    out = tmp_path / "sim_scale.json"
    result = _run("sim_scale.py", "--tiny", "--output", str(out))
    assert [r["running_sequences"] for r in result["results"]] == [16, 64]
    assert all(r["us_per_sequence_step"] > 0 and r["steps"] > 0 for r in result["results"])
    assert result["largest_over_smallest"] > 0


def test_prefix_routing_tiny(tmp_path):
    out = tmp_path / "prefix_routing.json"
    result = _run("prefix_routing.py", "--tiny", "--output", str(out))
    (regime,) = result["regimes"]
    shared = regime["workloads"]["shared-prefixes"]
    policies = [r["policy"] for r in shared["rows"]]
    assert policies == ["round-robin", "least-outstanding", "kv-aware-approx", "kv-aware-precise"]
    assert 0 < shared["oracle_hit_rate"] <= 1
    for row in shared["rows"]:
        assert row["output_throughput"] > 0 and 0 <= row["hit_rate"] <= 1
    # Shared prompts: the kv-aware policies find more cached tokens than round-robin does.
    by = {r["policy"]: r for r in shared["rows"]}
    assert by["kv-aware-precise"]["hit_rate"] > by["round-robin"]["hit_rate"]
    assert by["kv-aware-precise"]["decision_p50_us"] > 0
    unique = regime["workloads"]["no-shared-prefixes"]
    assert unique["oracle_hit_rate"] == 0


def test_prefix_routing_pd_tiny(tmp_path):
    out = tmp_path / "prefix_routing_pd.json"
    result = _run("prefix_routing_pd.py", "--tiny", "--output", str(out))
    (regime,) = result["regimes"]
    by = {r["policy"]: r for r in regime["rows"]}
    assert list(by) == [
        "round-robin", "least-outstanding", "kv-aware, decode by load",
        "kv-aware, decode by prefix",
    ]  # fmt: skip
    for row in by.values():
        assert row["output_throughput"] > 0 and 0 < row["kv_transferred_share"] <= 1
    # Placing the decode by prefix finds more of each prompt on the decode instance, so less
    # KV crosses the link than when the decode is placed by load.
    prefix, load = by["kv-aware, decode by prefix"], by["kv-aware, decode by load"]
    assert prefix["decode_hit_rate"] > load["decode_hit_rate"]
    assert prefix["kv_transferred_share"] < load["kv_transferred_share"]
    assert prefix["decisions"].get("prefix", 0) > load["decisions"].get("prefix", 0)
