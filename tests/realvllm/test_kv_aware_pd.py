"""Precise kv-aware routing with PD in front of real vLLM (CPU build): `ascend-serve up --engine
vllm` with one prefill and two decode engines of the tiny model (ascend-serve's KV connector
over TCP), every engine publishing its KV events as the planner renders them. The router
places each decode where vLLM says the prompt's prefix is cached; that decode engine finds the
prefix in its own cache and pulls only the rest over the connector (vLLM's own
prompt_tokens_by_source counters), and the answers equal those of a cold decode."""

from __future__ import annotations

import pytest

from serving import chat, kv_decisions, metric, precise_kv_aware_up, system_prompts

pytestmark = pytest.mark.realvllm

BLOCK = 128


def _by_source(engines: list[str], source: str) -> float:
    return sum(metric(e, "vllm:prompt_tokens_by_source_total", source=source) for e in engines)


def test_decode_goes_where_vllm_cached_the_prefix_and_pulls_the_rest(
    engine_python, tiny_model, tmp_path
):
    roles = [
        {"name": "prefill", "parallelism": {"tensor": 1}},
        {"name": "decode", "parallelism": {"tensor": 1}},
    ]
    up = precise_kv_aware_up(
        "tq-kv-pd", tiny_model("qwen3"), roles, tmp_path / "kv-pd", engine_python
    )
    try:
        url = up.wait_ready()
        decodes = up.members["decode"]
        assert len(decodes) == 2
        systems = system_prompts(2)
        cold = [chat(url, system, "question 0", 8) for system in systems]
        moved_cold = _by_source(decodes, "external_kv_transfer")
        computed_cold = _by_source(decodes, "local_compute")
        prompts_cold = sum(metric(e, "vllm:prompt_tokens_total") for e in decodes)
        assert _by_source(decodes, "local_cache_hit") == 0 and moved_cold >= 2 * BLOCK
        for q in (1, 2):
            for system in systems:
                chat(url, system, f"question {q}", 8)
        # The same first questions again: the decode engine holds their prefix now.
        assert [chat(url, system, "question 0", 8) for system in systems] == cold
        decisions = kv_decisions(url, role="decode")
        assert decisions == {"load": 2, "prefix": 6, "spill": 0}, decisions
        assert metric(url, "ascend_serve_router_kv_tokenize_failures_total") == 0
        # vLLM's own counters on the decode engines: each of the 6 later prompts found at
        # least one 128-token block of its system prompt cached there, and only the rest
        # came over the connector (the 2 cold prompts came whole).
        reused = _by_source(decodes, "local_cache_hit")
        assert reused >= 6 * BLOCK, reused
        moved = _by_source(decodes, "external_kv_transfer") - moved_cold
        computed = _by_source(decodes, "local_compute") - computed_cold
        prompts = sum(metric(e, "vllm:prompt_tokens_total") for e in decodes) - prompts_cold
        print(f"later prompts {prompts}: {reused} cached, {moved} moved, {computed} computed")
        assert reused + moved + computed == prompts and computed <= 6, (reused, moved, computed)
        assert all(metric(url, "ascend_serve_router_kv_index_blocks", engine=e) for e in decodes)
    finally:
        up.stop()
