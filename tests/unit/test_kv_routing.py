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
        affinity = kv.affinity("unified", "/v1/completions", body)
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
            pool.pick("unified", chooser=kv.affinity("unified", "/v1/completions", body)).url == A
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
    first = pool.pick(
        "unified", chooser=kv.affinity("unified", "/v1/completions", {"prompt": text})
    )
    again = pool.pick(
        "unified", chooser=kv.affinity("unified", "/v1/completions", {"prompt": text})
    )
    assert first is not None and again is not None and again.url == first.url
