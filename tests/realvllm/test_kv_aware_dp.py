"""Precise kv-aware routing in front of a data-parallel vLLM instance (CPU build): `ascend-serve
up --engine vllm` with two instances of two data-parallel ranks each. vLLM publishes rank r's
KV events on the configured port + r (its replay socket likewise); the router follows every
rank of every instance as one cache, and places repeated system prompts by prefix."""

from __future__ import annotations

import re

import pytest

from ascend_operator.local_setup import free_port
from serving import Up, engine_spec, metric, post

pytestmark = pytest.mark.realvllm


def test_every_rank_of_a_data_parallel_instance_is_followed(engine_python, tiny_model, tmp_path):
    roles = [{"name": "unified", "parallelism": {"tensor": 1, "data": 2, "dataLocal": 2}}]
    spec = engine_spec("tq-kv-dp", tiny_model("qwen3"), roles)
    spec["spec"]["replicas"] = 2
    spec["spec"]["router"] = {"policy": "kv-aware", "kvAware": {"mode": "precise"}}
    up = Up(spec, tmp_path / "kv-dp", engine_python, free_port())
    try:
        url = up.wait_ready()
        engines = up.members["unified"]
        assert len(engines) == 2
        systems = [" ".join(f"s{p}rule{i % 89}" for i in range(120)) for p in range(2)]
        for q in range(4):
            for system in systems:
                messages = [{"role": "system", "content": system},
                            {"role": "user", "content": f"question {q}"}]  # fmt: skip
                body = {"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0}
                post(url, body, "/v1/chat/completions")
        decisions = {
            reason: metric(url, "ascend_serve_router_kv_decisions_total", reason=reason)
            for reason in ("load", "prefix", "spill")
        }
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
