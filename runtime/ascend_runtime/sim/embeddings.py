"""Embeddings for the sim engine: OpenAI's /v1/embeddings semantics over deterministic
vectors.

A vector depends only on the input's tokens and the engine's seed, and has unit L2 norm, so
tests can check determinism, normalisation and batch order without a model. ``dimensions``
keeps the leading components and renormalises (how Matryoshka-trained models such as OpenAI's
text-embedding-3 shorten vectors).
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from typing import Any

from ascend_runtime.openai import EmbeddingRequest, OpenAIError
from ascend_runtime.sim.model import tokenize


def input_tokens(request: EmbeddingRequest, max_model_len: int) -> list[list[int]]:
    """Token ids of each input, in order; OpenAIError (400) for empty or oversized inputs."""
    raw = request.input
    if isinstance(raw, str):
        items: list[str] | list[list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # one input given as token ids
    else:
        items = list(raw)  # type: ignore[arg-type]
    if not items:
        raise OpenAIError(400, "input must not be an empty list", param="input")
    out = []
    for i, item in enumerate(items):
        param = "input" if len(items) == 1 else f"input[{i}]"
        if isinstance(item, str):
            if not item.strip():
                raise OpenAIError(400, f"{param} must not be empty", param=param)
            tokens = tokenize(item)
        else:
            if not item:
                raise OpenAIError(400, f"{param} must not be an empty token list", param=param)
            if any(t < 0 for t in item):
                raise OpenAIError(400, f"{param} has a negative token id", param=param)
            tokens = item
        if len(tokens) > max_model_len:
            raise OpenAIError(
                400,
                f"{param} has {len(tokens)} tokens, above this model's maximum context "
                f"length of {max_model_len}; shorten it or split it into several inputs",
                param=param,
            )
        out.append(tokens)
    return out


def output_dimensions(request: EmbeddingRequest, model_dim: int) -> int:
    """The vector length to return; OpenAIError (400) if ``dimensions`` exceeds the model's."""
    if request.dimensions is None:
        return model_dim
    if request.dimensions > model_dim:
        raise OpenAIError(
            400,
            f"dimensions {request.dimensions} exceeds this model's {model_dim}; "
            f"ask for {model_dim} or fewer",
            param="dimensions",
        )
    return request.dimensions


def embed(tokens: list[int], seed: int, model_dim: int, dims: int) -> list[float]:
    """A unit-norm vector for `tokens`: the first `dims` of `model_dim` seeded normal
    components, renormalised."""
    digest = hashlib.blake2b(
        struct.pack(f"<q{len(tokens)}Q", seed, *(t & 0xFFFFFFFFFFFFFFFF for t in tokens)),
        digest_size=8,
    ).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    values = [rng.gauss(0.0, 1.0) for _ in range(model_dim)][:dims]
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or base64 of little-endian float32 (OpenAI's format)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embeddings_response(
    request: EmbeddingRequest, vectors: list[list[float]], prompt_tokens: int
) -> dict[str, Any]:
    """The OpenAI response body for `vectors`, in input order."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, request.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
