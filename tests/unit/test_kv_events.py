"""KV events on vLLM's wire (kv.events): the batch encoding, both event layouts vLLM has
used, bad payloads, and a publisher and subscriber over real ZMQ sockets on localhost (gap
replay, engine restart). Our code on both ends; tests/realvllm/test_kv_events_wire.py checks
the encoding against vLLM's own types."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest
import zmq

from ascend_runtime.config import rank_endpoint
from ascend_runtime.kv.cache_events import AllBlocksCleared, BlockRemoved, BlockStored
from ascend_runtime.kv.events import (
    KvEventPublisher,
    KvEventSubscriber,
    decode_batch,
    encode_batch,
)
from helpers import until

STORED = BlockStored([11, 12], None, list(range(32)), 16)


def test_a_batch_round_trips_and_carries_vllms_fields():
    payload = encode_batch([STORED, BlockRemoved([11]), AllBlocksCleared()], 3)
    ts, events, rank = decode_batch(payload)
    assert ts > 0 and rank == 3
    assert events == [STORED, BlockRemoved([11]), AllBlocksCleared()]
    raw = msgspec.msgpack.decode(payload)
    assert raw[1][0] == {"type": "BlockStored", "block_hashes": [11, 12],
                         "parent_block_hash": None, "token_ids": list(range(32)),
                         "block_size": 16, "lora_id": None, "medium": "GPU",
                         "lora_name": None}  # fmt: skip
    assert raw[1][2] == {"type": "AllBlocksCleared"}


def test_the_older_array_layout_decodes_too():
    old = msgspec.msgpack.encode(
        [
            1.5,
            [
                ["BlockStored", [7], 6, [1, 2], 2, None, "GPU"],
                ["BlockRemoved", [7], "GPU"],
                ["AllBlocksCleared"],
                ["SomethingNew", 1],
            ],
        ]
    )
    ts, events, rank = decode_batch(old)
    assert (ts, rank) == (1.5, None)
    assert events == [BlockStored([7], 6, [1, 2], 2), BlockRemoved([7]), AllBlocksCleared()]


@pytest.mark.parametrize(
    "payload", [b"", b"\xc1", msgspec.msgpack.encode({"a": 1}), msgspec.msgpack.encode([1])]
)
def test_malformed_batches_are_refused(payload):
    with pytest.raises(ValueError, match="not a KV event batch"):
        decode_batch(payload)


def test_rank_endpoints_follow_vllms_rule():
    assert rank_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert rank_endpoint("tcp://10.0.0.1:5557", 2) == "tcp://10.0.0.1:5559"
    assert rank_endpoint("tcp://*:0", 2) == "tcp://*:0"
    assert rank_endpoint("inproc://cache", 1) == "inproc://cache_dp1"


@pytest.mark.asyncio
async def test_subscriber_follows_replays_gaps_and_sees_restarts():
    pub = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    pub.start()
    received: list = []
    sub = KvEventSubscriber(pub.endpoint, received.extend, replay_endpoint=pub.replay_endpoint)
    sub.start()
    try:
        # PUB drops what it sends before the subscription is up: probe until one arrives.
        while not received:
            pub.add(AllBlocksCleared())
            pub.flush()
            await asyncio.sleep(0.05)
        await until(lambda: sub.last_seq == pub._seq - 1)
        received.clear()
        pub.add(BlockStored([1], None, [5] * 4, 4))
        pub.flush()
        # Lose one batch on the wire (kept for replay), as a slow subscriber would.
        pub.add(BlockStored([2], 1, [6] * 4, 4))
        real_send = pub._pub.send_multipart
        pub._pub.send_multipart = lambda *a, **k: None
        pub.flush()
        pub._pub.send_multipart = real_send
        pub.add(BlockRemoved([1]))
        pub.flush()
        await until(lambda: len(received) >= 3)
        assert received == [BlockStored([1], None, [5] * 4, 4), BlockStored([2], 1, [6] * 4, 4),
                            BlockRemoved([1])]  # fmt: skip
        assert sub.gaps == 1 and sub.restarts == 0
    finally:
        await pub.close()
    # The engine restarts on the same endpoint: numbers start again at 0. (ZMQ frees the
    # port in its I/O thread after close: retry the bind as a restarting engine would.)
    restarted = None
    for _ in range(200):
        try:
            restarted = KvEventPublisher(pub.endpoint)
            break
        except zmq.ZMQError:
            await asyncio.sleep(0.025)
    assert restarted is not None
    try:
        received.clear()
        while not received:
            restarted.add(BlockStored([9], None, [1] * 4, 4))
            restarted.flush()
            await asyncio.sleep(0.05)
        assert received[0] == AllBlocksCleared() and sub.restarts == 1
    finally:
        await sub.close()
        await restarted.close()


@pytest.mark.asyncio
async def test_a_gap_without_replay_reports_everything_cleared():
    pub = KvEventPublisher("tcp://127.0.0.1:0")
    received: list = []
    sub = KvEventSubscriber(pub.endpoint, received.extend)
    sub.start()
    try:
        while not received:
            pub.add(BlockRemoved([0]))
            pub.flush()
            await asyncio.sleep(0.05)
        await until(lambda: sub.last_seq == pub._seq - 1)
        received.clear()
        pub._seq += 5  # five batches never sent
        pub.add(BlockRemoved([3]))
        pub.flush()
        await until(lambda: len(received) >= 2)
        assert received == [AllBlocksCleared(), BlockRemoved([3])] and sub.gaps == 1
    finally:
        await sub.close()
        await pub.close()


@pytest.mark.asyncio
async def test_a_new_subscriber_catches_up_from_the_replay_buffer():
    """A router that starts (or restarts) after the engine has cached blocks learns them from
    the replay buffer at once, not at the engine's next step; batches published while it
    catches up arrive once each, in order, and are not taken for an engine restart."""
    pub = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    pub.start()
    for i in range(3):
        pub.add(BlockStored([i], None, [i] * 4, 4))
        pub.flush()
    received: list = []
    sub = KvEventSubscriber(pub.endpoint, received.extend, replay_endpoint=pub.replay_endpoint)
    sub.start()
    try:
        await until(lambda: len(received) >= 3)
        assert received[:3] == [BlockStored([i], None, [i] * 4, 4) for i in range(3)]
        for i in range(3, 40):  # keeps publishing through the subscription's start
            pub.add(BlockStored([i], None, [i] * 4, 4))
            pub.flush()
            await asyncio.sleep(0.002)
        await until(lambda: sub.last_seq == pub._seq - 1 and len(received) >= 40)
        assert received == [BlockStored([i], None, [i] * 4, 4) for i in range(40)]
        assert sub.restarts == 0
    finally:
        await sub.close()
        await pub.close()


@pytest.mark.asyncio
async def test_ipv6_endpoints_work_as_the_planner_renders_them():
    """Engines bind the wildcard (the planner's tcp://*:port); a router on an IPv6 or
    dual-stack cluster connects to the pod IP in brackets."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"this machine has no IPv6 loopback ({exc})")
    pub = KvEventPublisher("tcp://*:0", "tcp://*:0")
    pub.start()
    pub.add(STORED)
    pub.flush()
    received: list = []
    port, replay = (e.rsplit(":", 1)[1] for e in (pub.endpoint, pub.replay_endpoint))
    sub = KvEventSubscriber(
        f"tcp://[::1]:{port}", received.extend, replay_endpoint=f"tcp://[::1]:{replay}"
    )
    sub.start()
    try:
        await until(lambda: received == [STORED])  # caught up from the replay socket
        pub.add(BlockRemoved([11]))
        pub.flush()
        await until(lambda: received == [STORED, BlockRemoved([11])])  # and live
    finally:
        await sub.close()
        await pub.close()


@pytest.mark.asyncio
async def test_catching_up_overlaps_batches_already_queued():
    """The replay at start and the SUB socket both carry the batches published meanwhile:
    each is applied once."""
    pub = KvEventPublisher("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    pub.start()
    received: list = []
    sub = KvEventSubscriber(pub.endpoint, received.extend, replay_endpoint=pub.replay_endpoint)
    real_replay = sub._replay

    async def slow_replay(first, until):
        for i in range(5):  # published after SUB connected, before the replay is answered
            pub.add(BlockStored([i], None, [i] * 4, 4))
            pub.flush()
            await asyncio.sleep(0.05)
        return await real_replay(first, until)

    sub._replay = slow_replay
    sub.start()
    try:
        await until(lambda: sub.last_seq == 4)
        pub.add(BlockStored([5], None, [5] * 4, 4))
        pub.flush()
        await until(lambda: len(received) >= 6)
        await asyncio.sleep(0.1)
        assert received == [BlockStored([i], None, [i] * 4, 4) for i in range(6)]
        assert sub.restarts == 0 and sub.gaps == 0
    finally:
        await sub.close()
        await pub.close()


def test_events_without_a_prefix_cache_are_refused():
    from pydantic import ValidationError

    from ascend_runtime.config import KvEventsSettings, SimSettings

    with pytest.raises(ValidationError, match=r"needs sim\.prefix_caching: true"):
        SimSettings(kv_events=KvEventsSettings())


@pytest.mark.asyncio
async def test_the_sim_server_publishes_what_its_cache_holds():
    """A sim engine (our engine, in process) with prefix caching and KV events: after a
    completion, a subscriber's index holds the prompt's full blocks under the hashes the router
    computes from the same tokens."""
    import httpx

    from ascend_operator.planner import plan_manifest
    from ascend_runtime.config import KvEventsSettings
    from ascend_runtime.kv.block_hash import block_hashes
    from ascend_runtime.router.prefix_index import PrefixIndex
    from ascend_runtime.sim import model
    from ascend_runtime.sim.server import SimServer
    from helpers import load_example

    config = plan_manifest(load_example("tiny-sim.yaml")).role("unified").runtime_config
    sim = config.sim.model_copy(update={
        "prefix_caching": True, "block_size": 4,
        "kv_events": KvEventsSettings(endpoint="tcp://127.0.0.1:0",
                                      replay_endpoint="tcp://127.0.0.1:0"),
    })  # fmt: skip
    server = SimServer(config.model_copy(update={"sim": sim}), 0, "127.0.0.1")
    await server.start()
    index, received = PrefixIndex(), []

    def apply(events):
        received.extend(events)
        for e in events:
            if isinstance(e, BlockStored):
                index.stored("engine", e.block_hashes)
            elif isinstance(e, BlockRemoved):
                index.removed("engine", e.block_hashes)

    prompt = " ".join(f"word{i}" for i in range(18))
    tokens = model.tokenize(prompt)
    hashes = block_hashes(tokens, 4)
    sub = KvEventSubscriber(server.kv_events.endpoint, apply,
                            replay_endpoint=server.kv_events.replay_endpoint)  # fmt: skip

    async def complete(client, text):
        r = await client.post("/v1/completions", json={
            "model": "tiny", "prompt": text, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.api),
                                     base_url="http://sim") as client:  # fmt: skip
            await complete(client, prompt)  # before anybody listens: its events are missed
            sub.start()
            # PUB drops batches sent before the subscription is up: new prompts until one
            # arrives; the subscriber then replays the engine's buffer from the start.
            for i in range(2000):
                await complete(client, f"other{i} {prompt}")
                if received:
                    break
                await asyncio.sleep(0.02)
            await until(lambda: index.matches(hashes, ["engine"])["engine"] >= len(hashes))
            hits = server.engine.cache.hit_tokens
            await complete(client, prompt)
        assert server.engine.cache.hit_tokens - hits == 4 * ((len(tokens) - 1) // 4)
    finally:
        await sub.close()
        await server.stop()
