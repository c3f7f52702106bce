"""The sim engine's embeddings: OpenAI request validation and deterministic unit vectors."""

from __future__ import annotations

import base64
import math
import struct

import pytest
from pydantic import ValidationError

from ascend_runtime.openai import EmbeddingRequest, OpenAIError
from ascend_runtime.sim.embeddings import (
    embed,
    embeddings_response,
    input_tokens,
    output_dimensions,
)
from ascend_runtime.sim.model import tokenize

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
