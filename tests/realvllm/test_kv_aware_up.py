"""Precise kv-aware routing in front of real vLLM (CPU build): `ascend-serve up --engine vllm`
with two engines of the tiny model, each publishing its KV events on its own ports as the
planner renders them (sha256_cbor, PYTHONHASHSEED=0, wildcard endpoints). The router takes
each chat's tokens from an engine's /tokenize and places it where vLLM says its system prompt
is cached; the engines' own prefix-cache counters agree."""

from __future__ import annotations

import pytest

from serving import chat, kv_decisions, metric, precise_kv_aware_up, system_prompts

pytestmark = pytest.mark.realvllm


def test_chats_go_where_vllm_cached_their_system_prompt(engine_python, tiny_model, tmp_path):
    roles = [{"name": "unified", "parallelism": {"tensor": 1}}]
    up = precise_kv_aware_up("tq-kv", tiny_model("qwen3"), roles, tmp_path / "kv", engine_python)
    try:
        url = up.wait_ready()
        engines = up.members["unified"]
        systems = system_prompts(2)
        for q in range(3):
            for system in systems:
                chat(url, system, f"question {q}")
        decisions = kv_decisions(url)
        assert decisions == {"load": 2, "prefix": 4, "spill": 0}, decisions
        assert metric(url, "ascend_serve_router_kv_tokenize_failures_total") == 0
        # vLLM's own counters: every repeat found its system prompt in that engine's cache
        hits = sum(metric(e, "vllm:prefix_cache_hits_total") for e in engines)
        assert hits >= 4 * 128, hits
        assert all(metric(url, "ascend_serve_router_kv_index_blocks", engine=e) for e in engines)
    finally:
        up.stop()
