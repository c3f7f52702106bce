"""The router's kv-aware wiring (router/kv_routing.py) over real ZMQ sockets on localhost:
instances that join are followed, instances that leave take their entries with them, one that
comes back is rebuilt from its replay buffer, and a request's placement is settled once. The
publishers are ours (kv/events.py, checked against vLLM's types in tests/realvllm)."""

from __future__ import annotations

import pytest

from ascend_runtime.config import KvAwareRouting, KvEventsEndpoint, RouterBackends
from ascend_runtime.kv.block_hash import block_hashes
from ascend_runtime.kv.cache_events import BlockStored
from ascend_runtime.kv.events import KvEventPublisher
from ascend_runtime.router.kv_routing import KvRouting
from ascend_runtime.router.metrics import RouterMetrics
from ascend_runtime.router.pool import Pool
from ascend_runtime.sim import model
from helpers import until

A, B = "http://127.0.0.1:1", "http://127.0.0.1:2"


@pytest.mark.asyncio
async def test_members_are_followed_forgotten_and_rebuilt():
    pubs = {u: KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0") for u in (A, B)}
    for pub in pubs.values():
        pub.start()
    backends = RouterBackends(
        source="static",
        static={"unified": [A, B]},
        kv_events={
            u: KvEventsEndpoint(endpoint=p.endpoint, replay_endpoint=p.replay_endpoint)
            for u, p in pubs.items()
        },
    )
    kv = KvRouting(KvAwareRouting(mode="precise", block_size=4), backends, RouterMetrics())
    pool = Pool(policy="kv-aware", listeners=[kv])
    pool.set_members("unified", [A, B])
    text = " ".join(f"t{i}" for i in range(12))
    hashes = block_hashes(model.tokenize(text), 4)
    # B cached the prompt before the router started
    pubs[B].add(BlockStored(hashes, None, model.tokenize(text), 4))
    pubs[B].flush()
    await kv.start([("unified", A), ("unified", B)])
    try:
        await until(lambda: kv.policy.index.size(B) == 3)
        body = {"prompt": text}
        affinity = kv.local_affinity("unified", "/v1/completions", body)
        assert affinity is not None and affinity.hashes == hashes
        backend = pool.pick("unified", chooser=affinity)
        assert backend is not None and backend.url == B
        assert kv.policy._pending_work[B] == 0  # all three blocks were cached
        affinity.settle()
        affinity.settle()  # settling twice is harmless
        assert kv.policy._sent == {}

        pool.remove("unified", B)
        assert kv.policy.index.size(B) == 0 and B not in kv.subscribers
        assert (
            pool.pick("unified", chooser=kv.local_affinity("unified", "/v1/completions", body)).url
            == A
        )

        pool.add("unified", B)  # back: its replay buffer tells what it holds
        await until(lambda: kv.policy.index.size(B) == 3)
    finally:
        await kv.stop()
        for pub in pubs.values():
            await pub.close()


@pytest.mark.asyncio
async def test_approximate_mode_subscribes_to_nothing():
    kv = KvRouting(
        KvAwareRouting(mode="approximate", block_size=4), RouterBackends(), RouterMetrics()
    )
    await kv.start([("unified", A)])
    assert kv.subscribers == {}
    text = " ".join(f"t{i}" for i in range(8))
    pool = Pool(policy="kv-aware", listeners=[kv])
    pool.set_members("unified", [A, B])
    earlier = kv.local_affinity("unified", "/v1/completions", {"prompt": text})
    first = pool.pick("unified", chooser=earlier)
    earlier.finish()  # answered: the next request with this prompt finds it there
    again = pool.pick(
        "unified", chooser=kv.local_affinity("unified", "/v1/completions", {"prompt": text})
    )
    assert first is not None and again is not None and again.url == first.url


@pytest.mark.asyncio
async def test_pd_places_the_decode_apart_from_the_prefill_and_by_its_own_history():
    """PD: one prompt's prefill and decode placements are separate (their own keys, their
    own role's instances and KV blocks); a conversation's next turn finds both again, and a
    cold prompt goes to the decode instance holding less."""
    settings = KvAwareRouting(mode="approximate", block_size=4,
                              kv_blocks={"prefill": 100, "decode": 1000})  # fmt: skip
    kv = KvRouting(settings, RouterBackends(), RouterMetrics())
    await kv.start([])
    pool = Pool(policy="kv-aware", listeners=[kv])
    prefills, decodes = ["http://p:1", "http://p:2"], ["http://d:1", "http://d:2"]
    pool.set_members("prefill", prefills)
    pool.set_members("decode", decodes)
    history = " ".join(f"t{i}" for i in range(40))

    def place(text: str) -> tuple[str, str]:
        prefill = kv.local_affinity("prefill", "/v1/completions", {"prompt": text})
        assert prefill is not None
        decode = prefill.for_role("decode")
        assert decode.hashes == prefill.hashes and decode.key != prefill.key
        p, d = pool.pick("prefill", chooser=prefill), pool.pick("decode", chooser=decode)
        assert p is not None and d is not None and p.role == "prefill" and d.role == "decode"
        prefill.settle()
        decode.settle()
        return p.url, d.url

    first = place(history)
    follow_up = history + " and a follow-up question"
    assert place(follow_up) == first
    blocks = len(kv.local_affinity("decode", "/v1/completions", {"prompt": follow_up}).hashes)
    assert kv.policy.index.size(first[1]) == blocks  # the decode's own routing history
    decisions = kv.metrics.kv_decisions
    assert decisions.labels("decode", "prefix")._value.get() == 1
    assert decisions.labels("decode", "load")._value.get() == 1
    # a prompt sharing nothing goes to the other decode instance (it caches less)
    other = place(" ".join(f"u{i}" for i in range(40)))
    assert other[1] != first[1]
    await kv.stop()


@pytest.mark.asyncio
async def test_vllm_hashing_takes_tokens_from_the_request_or_the_engines():
    """hashing vllm: a token-id prompt is hashed as given; a text prompt or a chat goes to
    the engines' /tokenize with the fields that decide its tokens; no answer, no placement.
    (tests/realvllm/test_vllm_block_hashes.py runs this against real vLLM.)"""
    from ascend_runtime.kv.vllm_hash import VllmBlockHasher

    asked: list[tuple[str, dict]] = []
    answer: list[int] | None = list(range(40))

    async def tokenize(role, query):
        asked.append((role, query))
        return answer

    metrics = RouterMetrics()
    settings = KvAwareRouting(mode="precise", block_size=16, hashing="vllm")
    kv = KvRouting(settings, RouterBackends(), metrics, tokenize=tokenize)
    hasher = VllmBlockHasher("sha256_cbor", "0")
    given = await kv.affinity("unified", "/v1/completions", {"prompt": list(range(100, 140))})
    assert given.hashes == hasher.block_hashes(list(range(100, 140)), 16) and not asked
    chat = {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True,
            "max_tokens": 3, "temperature": 0.5}  # fmt: skip
    placed = await kv.affinity("prefill", "/v1/chat/completions", chat)
    assert placed.hashes == hasher.block_hashes(answer, 16)
    assert asked == [("prefill", {"messages": chat["messages"], "add_generation_prompt": True})]
    text = await kv.affinity("unified", "/v1/completions", {"prompt": ["a b"], "n": 2})
    assert text is not None and asked[-1] == ("unified", {"prompt": "a b"})
    answer = None
    assert await kv.affinity("unified", "/v1/completions", {"prompt": "x"}) is None
    assert metrics.kv_tokenize_failures.labels("unified")._value.get() == 1
    assert await kv.affinity("unified", "/v1/completions", {"prompt": ["a", "b"]}) is None


@pytest.mark.asyncio
async def test_vllm_hashing_keys_a_salted_prompts_first_block_and_skips_multimodal_chats():
    """vLLM keys a request's first block with its cache_salt (test_vllm_block_hashes checks
    it against real vLLM's events); a salt vLLM refuses, or a chat with image parts (keys not
    modelled), is placed by load."""
    from ascend_runtime.kv.vllm_hash import VllmBlockHasher

    async def tokenize(role, query):
        return list(range(40))

    settings = KvAwareRouting(mode="precise", block_size=16, hashing="vllm")
    kv = KvRouting(settings, RouterBackends(), RouterMetrics(), tokenize=tokenize)
    hasher = VllmBlockHasher("sha256_cbor", "0")
    plain = await kv.affinity("unified", "/v1/completions", {"prompt": "x"})
    salted = await kv.affinity("unified", "/v1/completions", {"prompt": "x", "cache_salt": "t1"})
    assert plain.hashes == hasher.block_hashes(list(range(40)), 16)
    assert salted.hashes == hasher.block_hashes(list(range(40)), 16, cache_salt="t1")
    assert not set(salted.hashes) & set(plain.hashes)  # the salt changes every later block
    for salt in ("", 7, ["t1"]):
        body = {"prompt": "x", "cache_salt": salt}
        assert await kv.affinity("unified", "/v1/completions", body) is None
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]}]}  # fmt: skip
    assert await kv.affinity("unified", "/v1/chat/completions", image) is None
    text_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert await kv.affinity("unified", "/v1/chat/completions", text_parts) is not None
