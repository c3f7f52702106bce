"""Precise kv-aware routing in front of a data-parallel vLLM instance (CPU build): `ascend-serve
up --engine vllm` with two instances of two data-parallel ranks each. vLLM publishes rank r's
KV events on the configured port + r (its replay socket likewise); the router follows every
rank of every instance as one cache, and places repeated system prompts by prefix."""

from __future__ import annotations

import re

import pytest

from serving import chat, kv_decisions, metric, precise_kv_aware_up, system_prompts

pytestmark = pytest.mark.realvllm


def test_every_rank_of_a_data_parallel_instance_is_followed(engine_python, tiny_model, tmp_path):
    roles = [{"name": "unified", "parallelism": {"tensor": 1, "data": 2, "dataLocal": 2}}]
    up = precise_kv_aware_up(
        "tq-kv-dp", tiny_model("qwen3"), roles, tmp_path / "kv-dp", engine_python
    )
    try:
        url = up.wait_ready()
        engines = up.members["unified"]
        assert len(engines) == 2
        systems = system_prompts(2)
        for q in range(4):
            for system in systems:
                chat(url, system, f"question {q}")
        decisions = kv_decisions(url)
        # vLLM's own balancer spreads an instance's requests over its ranks, and each rank
        # caches what it served: the router's index holds both ranks' blocks as one instance.
        assert decisions["load"] == 2 and decisions["prefix"] + decisions["spill"] == 6, decisions
        assert decisions["prefix"] >= 4, decisions
        assert metric(url, "ascend_serve_router_kv_event_gaps") == 0
        # one subscription per rank: rank r's events on the instance's base port + r
        followed = re.findall(
            r"following the KV events of unified instance (\S+) at tcp://[\d.]+:(\d+), "
            r"tcp://[\d.]+:(\d+)",
            (up.run_dir / "router.log").read_text(),
        )
        assert sorted(u for u, _, _ in followed) == sorted(engines), followed
        assert all(int(p1) == int(p0) + 1 for _, p0, p1 in followed), followed
        for engine in engines:
            assert metric(url, "ascend_serve_router_kv_index_blocks", engine=engine) > 0
            # both ranks of the instance answered and cached (vLLM counts per engine index)
            for rank in ("0", "1"):
                assert metric(engine, "vllm:prompt_tokens_total", engine=rank) > 0, (engine, rank)
    finally:
        up.stop()
