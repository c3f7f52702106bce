"""Precise kv-aware routing in front of real vLLM (CPU build): `ascend-serve up --engine vllm`
with two engines of the tiny model, each publishing its KV events on its own ports as the
planner renders them (sha256_cbor, PYTHONHASHSEED=0, wildcard endpoints). The router tokenizes
each chat with the model's own tokenizer files (router/hf_prompts.py), checks its first
prompts against an engine's /tokenize, and places each chat where vLLM says its system prompt
is cached; the engines' own prefix-cache counters agree."""

from __future__ import annotations

import time

import pytest

from ascend_runtime.router.hf_prompts import HfPrompts
from ascend_runtime.router.prompt_hashes import tokenize_request
from serving import chat, kv_decisions, metric, post, precise_kv_aware_up, system_prompts

pytestmark = pytest.mark.realvllm


@pytest.fixture(scope="module")
def kv_up(engine_python, tiny_model, tmp_path_factory):
    roles = [{"name": "unified", "parallelism": {"tensor": 1}}]
    model = tiny_model("qwen3")
    workdir = tmp_path_factory.mktemp("kv")
    up = precise_kv_aware_up("tq-kv", model, roles, workdir, engine_python)
    try:
        url = up.wait_ready()
        yield up, url, model
    finally:
        up.stop()


def _wait_metric(url: str, name: str, value: float, timeout: float = 120, **labels) -> None:
    deadline = time.monotonic() + timeout
    while (seen := metric(url, name, **labels)) != value:
        assert time.monotonic() < deadline, f"{name}{labels} stayed {seen}, not {value}"
        time.sleep(0.2)


def test_chats_go_where_vllm_cached_their_system_prompt(kv_up):
    up, url, _ = kv_up
    engines = up.members["unified"]
    # the router loads the model's tokenizer in the background as it starts
    _wait_metric(url, "ascend_serve_router_kv_router_tokenizer", 1)
    systems = system_prompts(2)
    for q in range(3):
        for system in systems:
            chat(url, system, f"question {q}")
    decisions = kv_decisions(url)
    assert decisions == {"load": 2, "prefix": 4, "spill": 0}, decisions
    assert metric(url, "ascend_serve_router_kv_tokenized_total", where="router") == 6
    assert metric(url, "ascend_serve_router_kv_tokenized_total", where="engine") == 0
    assert metric(url, "ascend_serve_router_kv_tokenize_failures_total") == 0
    # every one of them was checked against an engine's /tokenize, and agreed
    _wait_metric(url, "ascend_serve_router_kv_tokenizer_checks_total", 6, result="match")
    assert metric(url, "ascend_serve_router_kv_tokenizer_checks_total", result="mismatch") == 0
    # vLLM's own counters: every repeat found its system prompt in that engine's cache
    hits = sum(metric(e, "vllm:prefix_cache_hits_total") for e in engines)
    assert hits >= 4 * 128, hits
    assert all(metric(url, "ascend_serve_router_kv_index_blocks", engine=e) for e in engines)


def test_the_routers_tokens_are_vllms_for_every_form_it_reproduces(kv_up):
    """HfPrompts over the model directory against real vLLM's /tokenize, request by request:
    chats of several turns, generation prompt off, a final message continued, special tokens
    asked for, the template's own tokens inside a message, other scripts, completions."""
    up, _, model = kv_up
    engine = up.members["unified"][0]
    prompts = HfPrompts.load(str(model))
    system = " ".join(f"rule{i} cache\n" for i in range(60))
    turns = [
        {"role": "system", "content": system},
        {"role": "user", "content": "caf\u00e9 \u6f22\u5b57 \U0001f600  two  spaces\t"},
        {"role": "assistant", "content": "an <|im_end|> inside, then <|im_start|>user"},
        {"role": "user", "content": ""},
    ]
    bodies = [
        ("/v1/chat/completions", {"messages": turns}),
        ("/v1/chat/completions", {"messages": turns[:3], "add_generation_prompt": False}),
        (
            "/v1/chat/completions",
            {"messages": turns[:3], "add_generation_prompt": False, "continue_final_message": True},
        ),
        ("/v1/chat/completions", {"messages": turns, "add_special_tokens": True}),
        ("/v1/chat/completions", {"messages": turns, "chat_template_kwargs": {"x": True}}),
        ("/v1/completions", {"prompt": system + " <|endoftext|> tail "}),
        ("/v1/completions", {"prompt": ["\n\nleading newlines"], "add_special_tokens": False}),
    ]
    for route, body in bodies:
        pieces = prompts.pieces(route, body)
        assert pieces is not None, body
        _, query = tokenize_request(route, body)
        expected = post(engine, {"model": "tiny", **query}, "/tokenize")["tokens"]
        assert prompts.tokens(pieces) == expected, body
