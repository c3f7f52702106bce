"""bench/vllm_serve.py in its tiny mode, so it keeps working: vLLM's own benchmark client
against a real engine directly, through our router, and through a PD deployment's router. No
speed is asserted; every request must succeed on every path."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving import run_bench_tiny

pytestmark = pytest.mark.realvllm


def test_vllm_bench_serve_tiny(engine_python: Path, tiny_model, tmp_path):
    tiny_model("qwen3")  # built by the fixture's cache, shared with the script
    report = run_bench_tiny("vllm_serve.py", engine_python, tmp_path / "vllm_serve.json")
    assert "CPU only" in report["device"] and report["results"]
    for row in report["results"]:
        for path in ("direct", "router", "pd_router"):
            assert row[path]["completed"] == report["num_prompts"], (path, row[path])
            assert row[path]["failed"] == 0, (path, row[path])
        assert row["router_vs_direct_output_throughput"] > 0
