"""bench/vllm_serve.py in its tiny mode, so it keeps working: vLLM's own benchmark client
against a real engine directly, through our router, and through a PD deployment's router. No
speed is asserted; every request must succeed on every path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.realvllm


def test_vllm_bench_serve_tiny(engine_python: Path, tiny_model, tmp_path):
    tiny_model("qwen3")  # built by the fixture's cache, shared with the script
    out = tmp_path / "vllm_serve.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "vllm_serve.py"), "--tiny", "--output", str(out),
         "--vllm-python", str(engine_python)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert "CPU only" in report["device"] and report["results"]
    for row in report["results"]:
        for path in ("direct", "router", "pd_router"):
            assert row[path]["completed"] == report["num_prompts"], (path, row[path])
            assert row[path]["failed"] == 0, (path, row[path])
        assert row["router_vs_direct_output_throughput"] > 0
