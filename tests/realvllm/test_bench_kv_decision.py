"""bench/kv_decision.py in its tiny mode, so it keeps working: kv-aware decisions with the
prompt tokenized by a real vLLM engine's /tokenize and by the router's own tokenizer. No speed
is asserted; both paths must hash the same prompts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.realvllm


def test_kv_decision_tiny(engine_python: Path, tiny_model, tmp_path):
    tiny_model("qwen3")  # built by the fixture's cache, shared with the script
    out = tmp_path / "kv_decision.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kv_decision.py"), "--tiny", "--output", str(out),
         "--vllm-python", str(engine_python)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert "CPU only" in report["device"]
    assert {(r["tokenizer"], r["case"]) for r in report["rows"]} == {
        (t, c) for t in ("engine", "router") for c in ("conversation", "fresh")
    }
    assert all(r["p50_us"] > 0 for r in report["rows"])
