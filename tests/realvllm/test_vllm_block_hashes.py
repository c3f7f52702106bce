"""Real vLLM (CPU build) publishing KV events: the block hashes its BlockStored events carry
equal what kv/vllm_hash.py computes from the token ids its /tokenize endpoint returns, for a
token-id prompt, a text prompt, a chat request and a salted prompt, with the settings the
planner renders for precise kv-aware routing (sha256_cbor, PYTHONHASHSEED=0)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from ascend_operator.local_setup import free_port
from ascend_runtime.kv.cache_events import BlockStored
from ascend_runtime.kv.events import KvEventSubscriber
from ascend_runtime.kv.vllm_hash import VllmBlockHasher
from serving import VllmEngine, post

pytestmark = pytest.mark.realvllm
BLOCK = 128


class Events:
    """A subscriber on its own event loop thread, collecting the hashes of BlockStored."""

    def __init__(self, endpoint: str, replay: str):
        self.stored: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint, replay), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _apply(self, events):
        for e in events:
            if isinstance(e, BlockStored):
                self.stored.extend(e.block_hashes)

    def _run(self, endpoint: str, replay: str) -> None:
        asyncio.set_event_loop(self._loop)
        self.sub = KvEventSubscriber(endpoint, self._apply, replay_endpoint=replay)
        self._loop.call_soon(self.sub.start)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sub.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def engine(engine_python, tiny_model, tmp_path_factory):
    events, replay = free_port(), free_port()
    # vLLM binds only wildcard endpoints; `tcp://host:port` makes its PUB socket connect to a
    # subscriber that binds. The planner renders the wildcard form, as here.
    config = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": f"tcp://*:{events}", "replay_endpoint": f"tcp://*:{replay}",
              "topic": ""}  # fmt: skip
    vllm = VllmEngine(
        engine_python,
        tiny_model("qwen3"),
        tmp_path_factory.mktemp("hashes") / "vllm.log",
        ["--max-model-len", "4096", "--enable-prefix-caching",
         "--prefix-caching-hash-algo", "sha256_cbor", "--kv-events-config", json.dumps(config)],
        env={"PYTHONHASHSEED": "0"},
    )  # fmt: skip
    try:
        url = vllm.wait()
        collector = Events(f"tcp://127.0.0.1:{events}", f"tcp://127.0.0.1:{replay}")
        try:
            yield url, collector, (events, replay)
        finally:
            collector.close()
    finally:
        vllm.stop()


def _until_stored(collector: Events, hashes: list[int], timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not set(hashes) <= set(collector.stored):
        assert time.monotonic() < deadline, (
            f"vLLM published {collector.stored[-8:]}, expected {hashes}; subscriber "
            f"batches={collector.sub.batches} malformed={collector.sub.malformed} "
            f"gaps={collector.sub.gaps} restarts={collector.sub.restarts}"
        )
        time.sleep(0.1)


HASHER = VllmBlockHasher("sha256_cbor", seed="0")


def test_token_id_prompts_hash_as_vllm_does(engine):
    url, collector, _ = engine
    tokens = [(7 * i + 3) % 500 + 10 for i in range(3 * BLOCK + 17)]
    hashes = HASHER.block_hashes(tokens, BLOCK)
    assert len(hashes) == 3
    post(url, {"model": "tiny", "prompt": tokens, "max_tokens": 1, "temperature": 0})
    _until_stored(collector, hashes)


def test_text_and_chat_hash_as_vllm_does_from_its_tokenize(engine):
    url, collector, _ = engine
    text = " ".join(f"word{i % 97}" for i in range(120))
    tokens = post(url, {"model": "tiny", "prompt": text}, path="/tokenize")["tokens"]
    assert len(tokens) >= 2 * BLOCK
    post(url, {"model": "tiny", "prompt": text, "max_tokens": 1, "temperature": 0})
    _until_stored(collector, HASHER.block_hashes(tokens, BLOCK))
    messages = [{"role": "system", "content": text}, {"role": "user", "content": "and then?"}]
    chat = post(url, {"model": "tiny", "messages": messages}, path="/tokenize")["tokens"]
    post(url, {"model": "tiny", "messages": messages, "max_tokens": 1}, path="/v1/chat/completions")
    _until_stored(collector, HASHER.block_hashes(chat, BLOCK))


def test_a_cache_salt_keys_the_first_block_as_vllm_does(engine):
    url, collector, _ = engine
    tokens = [(13 * i + 1) % 500 + 10 for i in range(2 * BLOCK + 5)]
    salted = HASHER.block_hashes(tokens, BLOCK, cache_salt="tenant-a")
    body = {"model": "tiny", "prompt": tokens, "max_tokens": 1, "temperature": 0}
    post(url, {**body, "cache_salt": "tenant-a"})
    _until_stored(collector, salted)
    assert not set(HASHER.block_hashes(tokens, BLOCK)) & set(collector.stored)
    post(url, body)  # unsalted, the same tokens are cached apart
    _until_stored(collector, HASHER.block_hashes(tokens, BLOCK))


def test_another_seed_or_algorithm_would_not_match(engine):
    url, collector, _ = engine
    tokens = [(11 * i + 5) % 500 + 10 for i in range(BLOCK)]
    post(url, {"model": "tiny", "prompt": tokens, "max_tokens": 1, "temperature": 0})
    _until_stored(collector, HASHER.block_hashes(tokens, BLOCK))
    for other in (VllmBlockHasher("sha256_cbor"), VllmBlockHasher("sha256", seed="0")):
        assert not set(other.block_hashes(tokens, BLOCK)) & set(collector.stored)


def test_the_router_places_by_real_vllm_events(engine):
    """The router's own kv-aware path (Router: the engine's /tokenize, vLLM's hashes, the
    events of the real engine) places a chat request whose system prompt vLLM has cached on
    that engine, not on the other member."""
    from ascend_runtime.config import (
        KvAwareRouting,
        KvEventsEndpoint,
        RouterBackends,
        RouterConfig,
    )
    from ascend_runtime.router.app import Router

    url, _, (events, replay) = engine
    other = f"http://127.0.0.1:{free_port()}"  # nothing serves here
    system = " ".join(f"rule{i % 89}" for i in range(150))
    config = RouterConfig(
        deployment="t", served_model_name="tiny", mode="unified", policy="kv-aware",
        kv_aware=KvAwareRouting(mode="precise", block_size=BLOCK, hashing="vllm",
                                kv_blocks={"unified": 256}),
        backends=RouterBackends(source="static", static={"unified": [other, url]}, kv_events={
            url: KvEventsEndpoint(endpoint=f"tcp://127.0.0.1:{events}",
                                  replay_endpoint=f"tcp://127.0.0.1:{replay}"),
            other: KvEventsEndpoint(endpoint=f"tcp://127.0.0.1:{free_port()}"),
        }),
    )  # fmt: skip

    def chat(question: str) -> dict:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return {"model": "tiny", "max_tokens": 1, "messages": messages}

    async def scenario() -> None:
        router = Router(config, health_interval=60)
        await router.start()
        try:
            await asyncio.to_thread(post, url, chat("first"), "/v1/chat/completions")
            kv = router.kv
            assert kv is not None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while kv.policy.index.size(url) < 2:
                assert loop.time() < deadline, kv.policy.index.size(url)
                await asyncio.sleep(0.05)
            affinity = await kv.affinity("unified", "/v1/chat/completions", chat("second"))
            assert affinity is not None and len(affinity.hashes) >= 2
            chosen = router.pool.pick("unified", chooser=affinity)
            assert chosen is not None and chosen.url == url
            assert kv.policy.reasons == {"prefix": 1}
            affinity.settle()
        finally:
            await router.stop()

    asyncio.run(scenario())
