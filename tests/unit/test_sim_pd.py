"""The sim engine's PD hand-off moves real KV bytes through ascend_runtime.kv: prefill PCP 2 x
TP 4 ranks to decode TP 4 x DCP 2 ranks, the same text as a unified instance, no leaked blocks,
and corrupt or missing KV ends in a clear error with every block returned."""

from __future__ import annotations

import json

import httpx
import pytest
import pytest_asyncio

from ascend_operator.planner import plan_manifest
from ascend_runtime.sim.server import SimServer
from helpers import load_example
from procs import free_port

BASE = {"model": "tiny", "prompt": " ".join(f"w{i}" for i in range(300)), "temperature": 0}


def configs(prefill: dict, decode: dict, runtime: dict | None = None):
    doc = load_example("tiny-sim-pd.yaml")
    doc["spec"]["runtime"]["version"] = "v0.13.0"  # PCP > 1 needs a v0.13 runtime
    doc["spec"]["runtime"].update(runtime or {})
    doc["spec"]["roles"] = [
        {"name": "prefill", "parallelism": prefill},
        {"name": "decode", "parallelism": decode},
    ]
    plan = plan_manifest(doc)
    unified = plan_manifest(load_example("tiny-sim.yaml")).role("unified").runtime_config
    return plan.role("prefill").runtime_config, plan.role("decode").runtime_config, unified


@pytest_asyncio.fixture
async def pd(request):
    p_cfg, d_cfg, u_cfg = configs(*request.param)
    servers = [
        SimServer(p_cfg, 0, "127.0.0.1", free_port(), bind_host="127.0.0.1"),
        SimServer(d_cfg, 0, "127.0.0.1"),
        SimServer(u_cfg, 0, "127.0.0.1"),
    ]
    clients = []
    for s in servers:
        await s.start()
        transport = httpx.ASGITransport(app=s.api)
        clients.append(httpx.AsyncClient(transport=transport, base_url="http://sim"))
    yield servers, clients
    for c in clients:
        await c.aclose()
    for s in servers:
        await s.stop()


async def post(client: httpx.AsyncClient, body: dict) -> httpx.Response:
    return await client.post(
        "/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"}
    )


CASES = [
    ({"tensor": 4, "prefillContext": 2}, {"tensor": 4, "decodeContext": 2}),
    ({"tensor": 2}, {"tensor": 1}),
    ({"tensor": 4}, {"tensor": 4, "decodeContext": 2}),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "pd", CASES, indirect=True, ids=["pcp2tp4-tp4dcp2", "tp2-tp1", "tp4-tp4dcp2"]
)
async def test_decode_continues_from_the_pulled_kv(pd):
    (prefill, decode, _), (p, d, u) = pd
    first = await post(
        p, {**BASE, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    )
    assert first.status_code == 200
    params = first.json()["kv_transfer_params"]
    assert params["remote_tp_size"] == prefill.exporter.placement.tp
    assert prefill.engine.pool.used > 0  # held for the decode side
    got = await post(d, {**BASE, "max_tokens": 8, "kv_transfer_params": params})
    want = await post(u, {**BASE, "max_tokens": 8})
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["text"] == want.json()["choices"][0]["text"]
    assert prefill.engine.pool.used == 0 and len(prefill.exporter.holds) == 0
    assert prefill.exporter.holds.stats.completed == 1
    assert decode.engine.pool.used == 0  # the finished sequence returned its blocks
    assert prefill.exporter.server.bytes_sent > 0


@pytest.mark.asyncio
@pytest.mark.parametrize("pd", CASES[:1], indirect=True, ids=["pcp2tp4-tp4dcp2"])
async def test_corrupt_and_missing_kv_are_clear_errors_and_leak_nothing(pd):
    (prefill, decode, _), (p, d, _) = pd
    first = await post(
        p, {**BASE, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    )
    params = first.json()["kv_transfer_params"]
    offset = prefill.exporter.caches.layout.offset("k", params["remote_block_ids"][0], 1, 0, 0)
    for rank in range(4):  # token 0 lives on PCP rank 0's four TP ranks (two per head)
        prefill.exporter.caches.buffers[rank]["k"][offset] ^= 0xFF
    bad = await post(d, {**BASE, "max_tokens": 4, "kv_transfer_params": params})
    assert bad.status_code == 502 and "corrupt" in bad.json()["error"]["message"]
    assert decode.engine.pool.used == 0
    assert prefill.engine.pool.used == 0  # the transfer itself completed: blocks freed

    again = await post(d, {**BASE, "max_tokens": 4, "kv_transfer_params": params})
    assert again.status_code == 400 and "expired or unknown" in again.json()["error"]["message"]
    other = {**BASE, "prompt": "short prompt"}
    mismatch = await post(d, {**other, "max_tokens": 2, "kv_transfer_params": params})
    assert mismatch.status_code == 400 and "another request" in mismatch.json()["error"]["message"]

    held = await post(
        p, {**BASE, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    )
    await prefill.exporter.server.stop()  # the prefill side goes away
    gone = await post(
        d, {**BASE, "max_tokens": 4, "kv_transfer_params": held.json()["kv_transfer_params"]}
    )
    assert gone.status_code == 502 and "could not pull KV" in gone.json()["error"]["message"]
    assert decode.engine.pool.used == 0
    assert prefill.exporter.release_expired(now=float("inf")) == 1
    assert prefill.engine.pool.used == 0


def corrupt_first_block(prefill: SimServer, params: dict, ranks: int) -> None:
    """Flip a K byte of the held prompt's first block on every rank (read back, it is
    caught as corrupt KV)."""
    caches = prefill.exporter.caches
    offset = caches.layout.offset("k", params["remote_block_ids"][0], 1, 0, 0)
    for rank in range(ranks):
        caches.buffers[rank]["k"][offset] ^= 0xFF


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "pd", [({"tensor": 2}, {"tensor": 1}, {"prefixCaching": True})], indirect=True,
    ids=["tp2-tp1-prefix-caching"],
)  # fmt: skip
async def test_decode_pulls_only_what_it_does_not_cache(pd):
    (prefill, decode, _), (p, d, u) = pd
    hold = {"max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    block = decode.engine.settings.block_size
    follow_up = {**BASE, "prompt": BASE["prompt"] + " " + " ".join(f"v{i}" for i in range(200))}

    # Nothing cached on decode yet: the corrupt first block is pulled and caught.
    params = (await post(p, {**follow_up, **hold})).json()["kv_transfer_params"]
    corrupt_first_block(prefill, params, ranks=2)
    bad = await post(d, {**follow_up, "max_tokens": 4, "kv_transfer_params": params})
    assert bad.status_code == 502 and "corrupt" in bad.json()["error"]["message"]
    assert decode.engine.cache.cached_blocks == 0 and decode.engine.pool.used == 0

    # The first turn decodes there, and its blocks stay cached on the decode instance.
    params = (await post(p, {**BASE, **hold})).json()["kv_transfer_params"]
    before = prefill.exporter.server.bytes_sent
    first = await post(d, {**BASE, "max_tokens": 8, "kv_transfer_params": params})
    assert first.status_code == 200, first.text
    assert decode.engine.cache.cached_blocks >= 2
    sent = prefill.exporter.server.bytes_sent
    per_token = (sent - before) / first.json()["usage"]["prompt_tokens"]

    # The follow-up shares its prefix: the decode instance reads those blocks from its own
    # cache (the corrupt copy on the prefill side is never read) and pulls only the rest.
    params = (await post(p, {**follow_up, **hold})).json()["kv_transfer_params"]
    corrupt_first_block(prefill, params, ranks=2)
    hits = decode.engine.cache.hit_tokens
    got = await post(d, {**follow_up, "max_tokens": 8, "kv_transfer_params": params})
    want = await post(u, {**follow_up, "max_tokens": 8})
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["text"] == want.json()["choices"][0]["text"]
    prompt_tokens = got.json()["usage"]["prompt_tokens"]
    reused = decode.engine.cache.hit_tokens - hits
    assert reused >= 2 * block and reused % block == 0 and reused < prompt_tokens
    pulled = prefill.exporter.server.bytes_sent - sent
    assert pulled == pytest.approx(per_token * (prompt_tokens - reused), rel=0.01)
    assert prefill.engine.pool.used == 0 and decode.engine.pool.used == 0
