"""bench/prefix_routing_vllm.py in its tiny mode, so it keeps working: vLLM's own client
through our router in front of two real vLLM engines, round-robin, least-outstanding and
kv-aware (precise, the router's own tokenizer). No speed is asserted; every request must
succeed, and kv-aware must have tokenized and placed every prompt itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving import run_bench_tiny

pytestmark = pytest.mark.realvllm


def test_prefix_routing_vllm_tiny(engine_python: Path, tiny_model, tmp_path):
    tiny_model("qwen3")  # built by the fixture's cache, shared with the script
    out = tmp_path / "prefix_routing_vllm.json"
    report = run_bench_tiny("prefix_routing_vllm.py", engine_python, out)
    assert "CPU only" in report["device"]
    rows = {r["policy"]: r for r in report["rows"]}
    assert set(rows) == {"round-robin", "least-outstanding", "kv-aware@0.25"}
    prompts = 16
    for row in rows.values():
        assert (row["completed"], row["failed"]) == (prompts, 0), row
        assert 0 < row["engine_prefix_cache_hit_rate"] < 1, row
    kv = rows["kv-aware@0.25"]
    assert kv["router_tokenized"] == prompts
    assert sum(kv["decisions"].values()) == prompts, kv["decisions"]
