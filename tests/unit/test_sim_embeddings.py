"""The sim engine's embeddings: OpenAI request validation and deterministic unit vectors."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest
import pytest_asyncio
from pydantic import ValidationError

from ascend_operator.planner import plan_manifest
from ascend_runtime.openai import EmbeddingRequest, OpenAIError
from ascend_runtime.sim.embeddings import (
    embed,
    embeddings_response,
    input_tokens,
    output_dimensions,
)
from ascend_runtime.sim.model import tokenize
from ascend_runtime.sim.server import SimServer
from helpers import load_example

DIM = 1024


def request(**fields) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": "bge-m3", **fields})


def vectors(req: EmbeddingRequest, seed: int = 0, max_len: int = 8192) -> list[list[float]]:
    dims = output_dimensions(req, DIM)
    return [embed(t, seed, DIM, dims) for t in input_tokens(req, max_len)]


def test_identical_inputs_give_identical_unit_vectors():
    a = vectors(request(input="the quick brown fox"))[0]
    b = vectors(request(input=["other", "the quick brown fox"]))[1]
    assert a == b
    assert len(a) == DIM
    assert math.isclose(math.fsum(v * v for v in a), 1.0, rel_tol=1e-12)
    assert vectors(request(input="the quick brown fox"), seed=1)[0] != a  # the seed matters
    assert vectors(request(input="the quick brown cat"))[0] != a


def test_batch_keeps_order_and_counts_usage():
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    req = request(input=texts)
    vecs = vectors(req)
    singles = [vectors(request(input=t))[0] for t in texts]
    assert vecs == singles
    body = embeddings_response(req, vecs, sum(len(tokenize(t)) for t in texts))
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["embedding"] for d in body["data"]] == singles
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    assert body["object"] == "list" and body["model"] == "bge-m3"


def test_token_id_inputs():
    one = request(input=[5, 6, 7])
    many = request(input=[[5, 6, 7], [8]])
    assert input_tokens(one, 10) == [[5, 6, 7]]
    assert input_tokens(many, 10) == [[5, 6, 7], [8]]
    assert vectors(one)[0] == vectors(many)[0]


def test_dimensions_truncates_and_renormalises():
    full = vectors(request(input="hello world"))[0]
    short = vectors(request(input="hello world", dimensions=256))[0]
    assert len(short) == 256
    assert math.isclose(math.fsum(v * v for v in short), 1.0, rel_tol=1e-12)
    scale = short[0] / full[0]
    pairs = zip(short, full[:256], strict=True)
    assert all(math.isclose(s, f * scale, rel_tol=1e-9) for s, f in pairs)


def test_base64_matches_float32_of_the_floats():
    req = request(input="hello", encoding_format="base64")
    vec = vectors(req)[0]
    encoded = embeddings_response(req, [vec], 1)["data"][0]["embedding"]
    decoded = struct.unpack(f"<{DIM}f", base64.b64decode(encoded))
    pairs = zip(decoded, vec, strict=True)
    assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in pairs)


@pytest.mark.parametrize(
    ("fields", "param", "text"),
    [
        ({"input": []}, "input", "empty list"),
        ({"input": ""}, "input", "must not be empty"),
        ({"input": ["ok", "  "]}, "input[1]", "must not be empty"),
        ({"input": [[1, 2], []]}, "input[1]", "empty token list"),
        ({"input": [-1, 2]}, "input", "negative token id"),
        ({"input": "a b c d e f"}, "input", "maximum context length of 5"),
        ({"input": ["a", "a b c d e f"]}, "input[1]", "maximum context length of 5"),
        ({"input": "x", "dimensions": DIM + 1}, "dimensions", f"this model's {DIM}"),
    ],
)
def test_invalid_inputs_are_openai_400s(fields, param, text):
    req = request(**fields)
    with pytest.raises(OpenAIError) as err:
        output_dimensions(req, DIM)
        input_tokens(req, 5)
    assert err.value.status == 400
    assert err.value.param == param
    assert text in err.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"input": 3},
        {"input": [1, "a"]},
        {"input": [["a"]]},
        {"input": "x", "dimensions": 0},
        {"input": "x", "encoding_format": "int8"},
        {},
    ],
)
def test_wrong_types_fail_validation(fields):
    with pytest.raises(ValidationError):
        request(**fields)


# --- served by the sim engine (in process) ------------------------------------------------


@pytest_asyncio.fixture
async def servers():
    """An embedding instance and a generative one, from the tiny-sim example's config."""
    config = plan_manifest(load_example("tiny-sim.yaml")).role("unified").runtime_config
    embed_server = SimServer(config.model_copy(update={"task": "embed"}), 0, "127.0.0.1")
    generate_server = SimServer(config, 1, "127.0.0.1")
    clients = []
    for server in (embed_server, generate_server):
        await server.start()
        clients.append(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=server.api), base_url="http://s")
        )
    yield config.served_model_name, embed_server, clients[0], clients[1]
    for c in clients:
        await c.aclose()
    for server in (embed_server, generate_server):
        await server.stop()


@pytest.mark.asyncio
async def test_embeddings_endpoint_batch_order_usage_and_metrics(servers):
    name, server, embed_client, _ = servers
    texts = ["one two three", "four", "one two three"]
    r = await embed_client.post("/v1/embeddings", json={"model": name, "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    data = body["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert data[0]["embedding"] == data[2]["embedding"] != data[1]["embedding"]
    assert len(data[0]["embedding"]) == server.settings.vector_dim
    assert math.isclose(math.fsum(v * v for v in data[1]["embedding"]), 1.0, rel_tol=1e-9)
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    single = await embed_client.post("/v1/embeddings", json={"model": name, "input": "four"})
    assert single.json()["data"][0]["embedding"] == data[1]["embedding"]
    metrics = (await embed_client.get("/metrics")).text
    assert "vllm:prompt_tokens_total{" in metrics
    prompt_total = next(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vllm:prompt_tokens_total{")
    )
    assert prompt_total == 8  # 7 + 1: every input went through the scheduler


@pytest.mark.asyncio
async def test_embeddings_errors_are_openai_shaped(servers):
    name, _, embed_client, generate_client = servers
    cases = [
        (embed_client, {"model": name, "input": []}, 400, "input"),
        (embed_client, {"model": name, "input": [1, "a"]}, 400, None),
        (embed_client, {"model": name, "input": "x " * 5000}, 400, "input"),
        (embed_client, {"model": "other", "input": "x"}, 404, "model"),
        (generate_client, {"model": name, "input": "x"}, 400, "model"),
    ]
    for client, body, status, param in cases:
        r = await client.post("/v1/embeddings", json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"]
        if param is not None:
            assert err["param"] == param
    r = await embed_client.post(
        "/v1/completions", json={"model": name, "prompt": "a", "max_tokens": 2}
    )
    assert r.status_code == 400
    assert "task: embed" in r.json()["error"]["message"]


def test_embedding_dim_is_serialized_only_when_set():
    """Unset, the field stays out of the rendered config, so generative deployments' pod
    template hashes do not change; set, it survives the round trip."""
    from ascend_runtime.config import SimSettings

    assert "embedding_dim" not in SimSettings().model_dump_json()
    assert SimSettings().vector_dim == 1024
    set_ = SimSettings(embedding_dim=384)
    back = SimSettings.model_validate_json(set_.model_dump_json())
    assert back.embedding_dim == 384 and back.vector_dim == 384
