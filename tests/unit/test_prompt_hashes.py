"""The router's prompt hashing (router/prompt_hashes.py) against what the sim engine computes:
the engine's own tokens of the whole prompt text (its chat template for messages), hashed with
kv.block_hash. Pure functions, no engine process."""

from __future__ import annotations

import random

import pytest

from ascend_runtime.kv.block_hash import block_hashes
from ascend_runtime.router import prompt_hashes
from ascend_runtime.router.prompt_hashes import PromptHasher, prompt_pieces
from ascend_runtime.sim import model

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _words(rng: random.Random, n: int) -> str:
    seps = [" ", "\n", "  ", "\t"]
    return "".join(f"w{rng.randrange(3000)}{rng.choice(seps)}" for _ in range(n))


def _engine_hashes(route: str, body: dict, block_size: int) -> list[int]:
    """What the sim engine caches for this request (sim/server.py's tokenization)."""
    if route == CHAT:
        text = "\n".join(model.chat_line(m["role"], m.get("content")) for m in body["messages"])
        return block_hashes(model.tokenize(text), block_size)
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return block_hashes(prompt, block_size)
    if isinstance(prompt, list):
        prompt = prompt[0]
    return block_hashes(model.tokenize(prompt), block_size)


@pytest.fixture(params=[64, prompt_hashes.CHUNK_CHARS], ids=["small-pieces", "pieces"])
def chunk_chars(request, monkeypatch):
    monkeypatch.setattr(prompt_hashes, "CHUNK_CHARS", request.param)
    return request.param


@pytest.mark.parametrize("block_size", [1, 7, 16, 128])
def test_router_hashes_equal_the_engines_for_every_prompt_form(block_size, chunk_chars):
    rng = random.Random(block_size)
    hasher = PromptHasher(block_size)
    system = _words(rng, 3000)  # crosses many chunk boundaries
    for _ in range(12):
        bodies = [
            (CHAT, {"messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": [{"type": "text", "text": _words(rng, 40)},
                                             {"type": "image_url"}, "junk"]},
                {"role": "assistant", "content": None},
                {"role": "user", "content": _words(rng, rng.randrange(0, 900))},
            ]}),
            (COMPLETIONS, {"prompt": system[: rng.randrange(len(system))] + _words(rng, 50)}),
            (COMPLETIONS, {"prompt": [_words(rng, 300)]}),
            (COMPLETIONS, {"prompt": [rng.randrange(99) for _ in range(rng.randrange(1, 99))]}),
            (COMPLETIONS, {"prompt": ""}),
            (COMPLETIONS, {"prompt": " \n "}),
        ]  # fmt: skip
        for route, body in bodies:
            pieces = prompt_pieces(route, body)
            assert pieces is not None
            assert hasher.hashes(pieces) == _engine_hashes(route, body, block_size), body


def test_chunks_depend_only_on_the_text_before_them(monkeypatch):
    monkeypatch.setattr(prompt_hashes, "CHUNK_CHARS", 512)
    rng = random.Random(3)
    text = _words(rng, 4000)
    whole = list(prompt_hashes._chunks(text))
    assert "".join(whole) == text and len(whole) > 5
    for cut in (100, 5000, 9000, len(text) - 7):
        prefix = list(prompt_hashes._chunks(text[:cut]))
        assert prefix[:-1] == whole[: len(prefix) - 1]


def test_a_shared_prefix_is_hashed_once_and_eviction_keeps_answers_right(chunk_chars):
    rng = random.Random(5)
    system = _words(rng, 2000)
    hasher = PromptHasher(16)

    def chat(question: str) -> dict:
        return {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": question}]}  # fmt: skip

    first = chat("hi")
    hasher.hashes(prompt_pieces(CHAT, first))
    states = len(hasher._states)
    second = {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "yo"}]
    }
    assert hasher.hashes(prompt_pieces(CHAT, second)) == _engine_hashes(CHAT, second, 16)
    assert len(hasher._states) == states + 1  # only the new message was hashed
    tiny = PromptHasher(16, max_bytes=4096)
    for body in (first, second, first):
        assert tiny.hashes(prompt_pieces(CHAT, body)) == _engine_hashes(CHAT, body, 16)
    assert tiny._held <= 4096 or len(tiny._states) == 1


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (CHAT, {"messages": "hello"}),
        (CHAT, {"messages": []}),
        (CHAT, {"messages": [{"content": "no role"}]}),
        (CHAT, {"messages": [{"role": 3, "content": "x"}]}),
        (CHAT, {"messages": ["not a dict"]}),
        (COMPLETIONS, {}),
        (COMPLETIONS, {"prompt": ["a", "b"]}),
        (COMPLETIONS, {"prompt": [1, "b"]}),
        (COMPLETIONS, {"prompt": [True, False]}),
        (COMPLETIONS, {"prompt": 7}),
        (COMPLETIONS, {"prompt": []}),
    ],
)
def test_bodies_without_one_prompt_are_not_placed(route, body):
    """A batch or a body the engine will refuse: the router balances it by load."""
    assert prompt_pieces(route, body) is None
