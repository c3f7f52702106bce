"""The sim engine's OpenAI API in process: formats, usage, errors, metrics."""

from __future__ import annotations

import json

import httpx
import pytest
import pytest_asyncio

from ascend_operator.planner import plan_manifest
from ascend_runtime.router.health import kv_blocks
from ascend_runtime.sim.server import SimServer
from helpers import load_example


@pytest_asyncio.fixture
async def client():
    plan = plan_manifest(load_example("tiny-sim.yaml"))
    server = SimServer(plan.role("unified").runtime_config, 0, "127.0.0.1")
    await server.start()
    transport = httpx.ASGITransport(app=server.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c
    await server.stop()


async def post(client, path, body, **kw):
    return await client.post(
        path,
        content=body if isinstance(body, bytes) else json.dumps(body),
        headers={"content-type": "application/json"},
        **kw,
    )


@pytest.mark.asyncio
async def test_completion_plain_and_usage(client):
    r = await post(
        client,
        "/v1/completions",
        {"model": "tiny", "prompt": "a b c", "max_tokens": 5, "temperature": 0},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert len(body["choices"][0]["text"].split()) == 5
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    again = (
        await post(
            client,
            "/v1/completions",
            {"model": "tiny", "prompt": "a b c", "max_tokens": 5, "temperature": 0},
        )
    ).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]


@pytest.mark.asyncio
async def test_seeded_sampling_is_reproducible(client):
    req = {"model": "tiny", "prompt": "x y", "max_tokens": 6, "temperature": 0.8, "seed": 42}
    a = (await post(client, "/v1/completions", req)).json()["choices"][0]["text"]
    b = (await post(client, "/v1/completions", req)).json()["choices"][0]["text"]
    c = (await post(client, "/v1/completions", {**req, "seed": 43})).json()["choices"][0]["text"]
    assert a == b and a != c


@pytest.mark.asyncio
async def test_chat_stream_with_usage(client):
    async with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    words = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert len(words) == 4 and all(w for w in words)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "other", "prompt": "x"}, 404, "does not exist"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "at least 1"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "at least 1"),
        ({"model": "tiny", "prompt": "x " * 5000}, 400, "maximum context length is 4096"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "maximum context length"),
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "temperature": 9}, 400, "temperature"),
        (b"[1, 2]", 400, "JSON object"),
    ],
)
async def test_bad_requests_get_openai_errors(client, body, status, fragment):
    r = await post(client, "/v1/completions", body)
    assert r.status_code == status
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]
    ok = await post(
        client, "/v1/completions", {"model": "tiny", "prompt": "still", "max_tokens": 1}
    )
    assert ok.status_code == 200


@pytest.mark.asyncio
async def test_oversized_body(client):
    r = await post(client, "/v1/completions", b"x" * (33 * 1024 * 1024))
    assert r.status_code == 413


@pytest.mark.asyncio
async def test_models_health_metrics(client):
    models = (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 4096
    assert (await client.get("/health")).status_code == 200
    await post(client, "/v1/completions", {"model": "tiny", "prompt": "m", "max_tokens": 3})
    text = (await client.get("/metrics")).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_success_total",
    ):
        assert name in text, name
    assert 'vllm:generation_tokens_total{engine="tiny-unified-0",model_name="tiny"} 3.0' in text
    # the router reads the engine's KV blocks where vLLM puts them
    assert (
        kv_blocks(text)
        == plan_manifest(load_example("tiny-sim.yaml"))
        .role("unified")
        .runtime_config.sim.num_blocks
    )
