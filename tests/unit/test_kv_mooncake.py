"""The Mooncake transport: addresses over ascend-serve's control protocol, bytes through a
one-sided engine. With mooncake-transfer-engine importable, its real engine moves the bytes
over its TCP protocol; the engine-independent parts run everywhere with an in-process engine
that copies between the registered addresses (what a one-sided read does on one host)."""

from __future__ import annotations

import asyncio
import ctypes
import random

import pytest

from ascend_runtime.kv.holds import Holds, KvTransferError
from ascend_runtime.kv.layout import KvLayout, KvSpec
from ascend_runtime.kv.mooncake import MooncakeEngine, MooncakeKvTransport, serve_registered
from ascend_runtime.kv.pull import placement_params, pull
from ascend_runtime.kv.rank_map import KvPlacement
from ascend_runtime.kv.tcp import TcpKvClient, TcpKvServer
from ascend_runtime.kv.transfer import region_of_bytes


class LocalEngine:
    """A one-sided engine within one process: reads are memmoves between registered ranges."""

    session = "local:0"

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.reads = 0

    def register(self, regions) -> None:
        self.ranges += [(r.address, r.length) for r in regions.values()]

    def _registered(self, addr: int, n: int) -> bool:
        return any(a <= addr and addr + n <= a + length for a, length in self.ranges)

    def read(self, session, local, remote, lengths) -> None:
        for dst, src, n in zip(local, remote, lengths, strict=True):
            if not (self._registered(dst, n) and self._registered(src, n)):
                raise KvTransferError("transfer_failed", "address outside registered memory")
            ctypes.memmove(dst, src, n)
        self.reads += 1


def _spec(blocks: int, heads: int) -> KvSpec:
    return KvSpec(2, blocks, 4, heads, 8, 4, 1)


async def _hand_off(engine, prefill_tp: int = 2, tokens: int = 11):
    prefill = KvPlacement(tp=prefill_tp, kv_heads=2, block_size=4, role="prefill")
    decode = KvPlacement(tp=1, kv_heads=2, block_size=4, role="decode")
    p_layout = KvLayout(_spec(6, prefill.heads_per_rank), "cross_layer")
    d_layout = KvLayout(_spec(5, decode.heads_per_rank), "cross_layer")
    rng = random.Random(7)
    p_bufs = {r: {w: bytearray(rng.randbytes(p_layout.buffer_bytes(w))) for w in ("k", "v")}
              for r in range(prefill.ranks)}  # fmt: skip
    p_regions = {
        r: {w: region_of_bytes(w, b) for w, b in bufs.items()} for r, bufs in p_bufs.items()
    }
    d_bufs = {w: bytearray(d_layout.buffer_bytes(w)) for w in ("k", "v")}
    d_regions = {w: region_of_bytes(w, b) for w, b in d_bufs.items()}
    released: list[str] = []
    holds = Holds(released.append, 30)
    server = TcpKvServer(lambda r: p_regions[r], holds, "p0", "127.0.0.1", 0)
    serve_registered(server, engine)
    await server.start()
    transport = MooncakeKvTransport(engine, TcpKvClient(timeout=10))
    try:
        holds.hold("req")
        params = {"remote_request_id": "req", "remote_engine_id": "p0", "remote_host": "127.0.0.1",
                  "remote_port": server.port, "remote_block_ids": [4, 1, 5],
                  "remote_ports": {str(r): server.port for r in range(prefill.ranks)}}  # fmt: skip
        params |= placement_params(prefill, p_layout)
        result = await pull(
            transport, params, local=decode, local_layout=d_layout, dst_blocks=[2, 0, 3],
            regions=lambda _r: d_regions, num_tokens=tokens,
        )  # fmt: skip
        # every decode head/token equals the prefill rank's bytes that hold it
        for t in range(tokens):
            for head in range(2):
                p_rank = head // prefill.heads_per_rank if prefill_tp > 1 else 0
                j = head - prefill.first_head(p_rank)
                for layer in range(2):
                    for w in ("k", "v"):
                        n = p_layout.spec.dim_of(w)
                        src = p_layout.offset(w, [4, 1, 5][t // 4], layer, t % 4, j)
                        dst = d_layout.offset(w, [2, 0, 3][t // 4], layer, t % 4, head)
                        assert d_bufs[w][dst : dst + n] == p_bufs[p_rank][w][src : src + n]
        return result, released, holds, transport, server
    finally:
        await transport.close()
        await server.stop()


def test_mooncake_transport_moves_kv_and_completes_holds_through_the_control_plane():
    engine = LocalEngine()
    result, released, holds, transport, _ = asyncio.run(_hand_off(engine))
    assert released == ["req"] and len(holds) == 0
    assert engine.reads == 2 and transport.bytes_received == result.bytes > 0


def test_mooncake_describe_refuses_unknown_requests_and_tcp_only_servers():
    async def run():
        layout = KvLayout(_spec(2, 2), "cross_layer")
        regions = {w: region_of_bytes(w, bytearray(layout.buffer_bytes(w))) for w in ("k", "v")}
        holds = Holds(lambda _r: None, 30)
        server = TcpKvServer(lambda _r: regions, holds, "p0", "127.0.0.1", 0)
        await server.start()
        client = TcpKvClient(timeout=5)
        transport = MooncakeKvTransport(LocalEngine(), client)
        from ascend_runtime.kv.transfer import PullOrder, Segment

        order = PullOrder("gone", "p0", 0, 0, {(0, 0)}, [Segment("k", 0, 8)], [Segment("k", 0, 8)])
        try:
            with pytest.raises(KvTransferError, match="TCP only") as tcp_only:
                await transport.read(("127.0.0.1", server.port), order, regions)
            assert tcp_only.value.code == "unsupported"
            serve_registered(server, LocalEngine())
            with pytest.raises(KvTransferError, match="no KV held for request gone"):
                await transport.read(("127.0.0.1", server.port), order, regions)
        finally:
            await client.close()
            await server.stop()

    asyncio.run(run())


def test_real_mooncake_engine_over_its_tcp_protocol():
    try:
        engine = MooncakeEngine("127.0.0.1", "tcp")
    except RuntimeError as exc:
        pytest.skip(f"mooncake-transfer-engine is not usable here: {exc}")
    result, released, *_ = asyncio.run(_hand_off(engine))
    assert released == ["req"] and result.bytes > 0
