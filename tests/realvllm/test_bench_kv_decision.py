"""bench/kv_decision.py in its tiny mode, so it keeps working: kv-aware decisions with the
prompt tokenized by a real vLLM engine's /tokenize and by the router's own tokenizer. No speed
is asserted; both paths must hash the same prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving import run_bench_tiny

pytestmark = pytest.mark.realvllm


def test_kv_decision_tiny(engine_python: Path, tiny_model, tmp_path):
    tiny_model("qwen3")  # built by the fixture's cache, shared with the script
    report = run_bench_tiny("kv_decision.py", engine_python, tmp_path / "kv_decision.json")
    assert "CPU only" in report["device"]
    assert {(r["tokenizer"], r["case"]) for r in report["rows"]} == {
        (t, c) for t in ("engine", "router") for c in ("conversation", "fresh")
    }
    assert all(r["p50_us"] > 0 for r in report["rows"])
