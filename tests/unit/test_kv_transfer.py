"""KV transfer over the built-in TCP transport: bytes land where the rank map says, holds are
released exactly once, and every fault ends in a clear error with nothing left held."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from ascend_runtime.kv.holds import Holds, KvTransferError
from ascend_runtime.kv.layout import KvLayout, KvSpec
from ascend_runtime.kv.pull import placement_params, pull
from ascend_runtime.kv.rank_map import KvPlacement
from ascend_runtime.kv.tcp import TcpKvClient, TcpKvServer, _send_frame
from ascend_runtime.kv.transfer import PullOrder, Segment, region_of_bytes

LAYERS, K_DIM, V_DIM = 3, 4, 2


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_holds_release_once_when_every_pair_is_done():
    released: list[str] = []
    holds = Holds(released.append, timeout=10)
    holds.hold("r1")
    holds.expect("r1", [(0, 0), (1, 0)])
    assert holds.done("r1", (0, 0)) is False
    with pytest.raises(KvTransferError, match="already reported") as dup:
        holds.done("r1", (0, 0))
    assert dup.value.code == "duplicate" and holds.stats.duplicates == 1
    with pytest.raises(KvTransferError, match="not among"):
        holds.done("r1", (5, 5))
    assert holds.done("r1", (1, 0)) is True
    assert released == ["r1"] and len(holds) == 0
    with pytest.raises(KvTransferError, match="no KV held") as gone:
        holds.done("r1", (1, 0))  # a late duplicate after release frees nothing twice
    assert gone.value.code == "kv_not_found" and released == ["r1"]


def test_holds_expire_abort_and_disagreeing_plans():
    released: list[str] = []
    clock = FakeClock()
    holds = Holds(released.append, timeout=5, clock=clock)
    for rid in ("a", "b", "c"):
        holds.hold(rid)
    holds.expect("c", [(0, 0)])
    with pytest.raises(KvTransferError, match="disagree"):
        holds.expect("c", [(0, 1)])
    clock.now = 4.9
    assert holds.expire() == []
    assert holds.abort("b") and not holds.abort("b")
    clock.now = 5.0
    assert sorted(holds.expire()) == ["a", "c"]
    assert sorted(released) == ["a", "b", "c"] and len(holds) == 0
    assert (holds.stats.expired, holds.stats.aborted) == (2, 1)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Holds(released.append, timeout=0)


class Prefill:
    """A prefill instance: one server for all its ranks, each rank's KV filled with markers."""

    def __init__(self, placement: KvPlacement, layout_name: str, num_tokens: int, timeout=30.0):
        self.placement = placement
        self.layout = KvLayout(
            KvSpec(LAYERS, 16, placement.block_size, placement.heads_per_rank, K_DIM, V_DIM, 1),
            layout_name,
        )
        self.buffers = {
            r: {w: bytearray(self.layout.buffer_bytes(w)) for w in ("k", "v")}
            for r in range(placement.ranks)
        }
        self.blocks = random.Random(1).sample(range(16), placement.blocks_needed(num_tokens))
        for r in range(placement.ranks):
            fill(self.placement, self.layout, self.blocks, r, num_tokens, self.buffers[r])
        self.released: list[str] = []
        self.holds = Holds(self.released.append, timeout)
        regions = {
            r: {w: region_of_bytes(w, b) for w, b in bufs.items()}
            for r, bufs in self.buffers.items()
        }
        self.server = TcpKvServer(regions.__getitem__, self.holds, "p-0", "127.0.0.1")

    def params(self, request_id: str = "req-1") -> dict:
        return {
            "remote_engine_id": "p-0",
            "remote_host": "127.0.0.1",
            "remote_port": self.server.port,
            "remote_ports": {str(r): self.server.port for r in range(self.placement.ranks)},
            "remote_request_id": request_id,
            "remote_block_ids": self.blocks,
        } | placement_params(self.placement, self.layout)


def marker(token: int, head: int, layer: int, which: str, i: int) -> int:
    return (token * 7 + head * 31 + layer * 101 + (which == "v") * 53 + i * 13) % 251


def fill(p, layout, blocks, rank, num_tokens, bufs) -> None:  # noqa: PLR0917
    first = p.first_head(p.split(rank)[1])
    for t in range(num_tokens):
        if p.slot_of_token(t) != p.slot_of_rank(rank):
            continue
        pos = p.local_position(t)
        for which, dim in (("k", K_DIM), ("v", V_DIM)):
            for layer in range(LAYERS):
                for j in range(p.heads_per_rank):
                    off = layout.offset(which, blocks[pos // p.block_size], layer,
                                        pos % p.block_size, j)  # fmt: skip
                    bufs[which][off : off + dim] = bytes(
                        marker(t, first + j, layer, which, i) for i in range(dim)
                    )


async def run_pull(
    prefill: Prefill,
    decode: KvPlacement,
    layout_name: str,
    num_tokens: int,
    *,
    client: TcpKvClient | None = None,
    params: dict | None = None,
):
    layout = KvLayout(
        KvSpec(LAYERS, 12, decode.block_size, decode.heads_per_rank, K_DIM, V_DIM, 1), layout_name
    )
    bufs = {
        r: {w: bytearray(layout.buffer_bytes(w)) for w in ("k", "v")} for r in range(decode.ranks)
    }
    regions = {r: {w: region_of_bytes(w, b) for w, b in v.items()} for r, v in bufs.items()}
    dst_blocks = list(range(11, 11 - decode.blocks_needed(num_tokens), -1))
    client = client or TcpKvClient(timeout=5)
    try:
        result = await pull(
            client,
            params or prefill.params(),
            local=decode,
            local_layout=layout,
            dst_blocks=dst_blocks,
            regions=regions.__getitem__,
            num_tokens=num_tokens,
        )
    finally:
        await client.close()
    expected = {
        r: {w: bytearray(layout.buffer_bytes(w)) for w in ("k", "v")} for r in range(decode.ranks)
    }
    for r in range(decode.ranks):
        fill(decode, layout, dst_blocks, r, num_tokens, expected[r])
    return result, bufs, expected


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("prefill", "decode", "layouts"),
    [
        (KvPlacement(1, 2, 8), KvPlacement(1, 2, 8), ("cross_layer", "cross_layer")),
        (KvPlacement(4, 2, 8), KvPlacement(2, 2, 4), ("cross_layer", "per_layer")),
        (
            KvPlacement(4, 2, 8, pcp=2, interleave=8),
            KvPlacement(2, 2, 8),
            ("per_layer", "cross_layer"),
        ),
        (
            KvPlacement(2, 1, 4, mla=True),
            KvPlacement(4, 1, 4, dcp=2, mla=True),
            ("cross_layer_hnd", "per_layer_hnd"),
        ),
    ],
)
async def test_pull_delivers_every_rank_its_kv_and_releases_the_hold(prefill, decode, layouts):
    num_tokens = 37
    side = Prefill(prefill, layouts[0], num_tokens)
    await side.server.start()
    try:
        side.holds.hold("req-1")
        result, got, want = await run_pull(side, decode, layouts[1], num_tokens)
    finally:
        await side.server.stop()
    assert got == want
    assert result.released and side.released == ["req-1"] and len(side.holds) == 0
    assert result.bytes == side.server.bytes_sent > 0


@pytest.mark.asyncio
async def test_unknown_request_and_wrong_engine_are_refused():
    side = Prefill(KvPlacement(1, 2, 8), "cross_layer", 10)
    await side.server.start()
    try:
        with pytest.raises(KvTransferError, match="no KV held for request req-1") as err:
            await run_pull(side, KvPlacement(1, 2, 8), "cross_layer", 10)
        assert err.value.code == "kv_not_found"
        side.holds.hold("req-1")
        params = side.params() | {"remote_engine_id": "p-9"}
        with pytest.raises(KvTransferError, match="this is prefill engine p-0, not p-9"):
            await run_pull(side, KvPlacement(1, 2, 8), "cross_layer", 10, params=params)
        with pytest.raises(KvTransferError, match="lack remote_kv_layout"):
            params = side.params()
            del params["remote_kv_layout"]
            await run_pull(side, KvPlacement(1, 2, 8), "cross_layer", 10, params=params)
    finally:
        await side.server.stop()
    assert side.released == [] and len(side.holds) == 1  # still held for the right reader


async def _silent_server() -> tuple[socket.socket, int]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock, sock.getsockname()[1]


def _order(size: int) -> PullOrder:
    return PullOrder("r", "p-0", 0, 0, {(0, 0)}, [Segment("k", 0, size)], [Segment("k", 0, size)])


@pytest.mark.asyncio
async def test_timeout_is_a_clear_error():
    sock, port = await _silent_server()  # accepts (backlog) but never answers
    client = TcpKvClient(timeout=0.3)
    local = {"k": region_of_bytes("k", bytearray(64))}
    try:
        with pytest.raises(KvTransferError, match=r"took longer than 0.3 s") as err:
            await client.read(("127.0.0.1", port), _order(64), local)
        assert err.value.code == "timeout"
    finally:
        sock.close()
        await client.close()


@pytest.mark.asyncio
async def test_sender_killed_mid_transfer():
    loop = asyncio.get_running_loop()
    sock, port = await _silent_server()

    async def half_then_die() -> None:
        conn, _ = await loop.sock_accept(sock)
        conn.setblocking(False)
        await loop.sock_recv(conn, 65536)
        await _send_frame(loop, conn, {"ok": True, "bytes": 8 << 20}, 8 << 20)
        await loop.sock_sendall(conn, b"x" * 1000)
        conn.close()

    task = asyncio.create_task(half_then_die())
    client = TcpKvClient(timeout=5)
    local = {"k": region_of_bytes("k", bytearray(8 << 20))}
    try:
        with pytest.raises(KvTransferError, match="closed the connection after 1000 of") as err:
            await client.read(("127.0.0.1", port), _order(8 << 20), local)
        assert err.value.code == "connection_lost"
        with pytest.raises(KvTransferError, match=r"Connection refused|failed"):
            sock.close()
            await client.read(("127.0.0.1", port), _order(16), local)
    finally:
        await task
        await client.close()


@pytest.mark.asyncio
async def test_receiver_killed_mid_transfer_leaks_nothing():
    clock = FakeClock()
    side = Prefill(KvPlacement(1, 2, 128), "cross_layer", 1024)
    side.holds = Holds(side.released.append, timeout=5, clock=clock)
    side.server.holds = side.holds
    await side.server.start()
    loop = asyncio.get_running_loop()
    try:
        side.holds.hold("req-1")
        sock = socket.create_connection(("127.0.0.1", side.server.port))
        sock.setblocking(False)
        size = side.layout.buffer_bytes("k")
        order = PullOrder("req-1", "p-0", 0, 0, {(0, 0)}, [Segment("k", 0, size)] * 2048, [])
        await _send_frame(loop, sock, {
            "op": "read", "request_id": "req-1", "engine_id": "p-0", "rank": 0, "consumer": 0,
            "expected": [[0, 0]], "segments": [["k", s.offset, s.length] for s in order.reads],
        })  # fmt: skip
        await loop.sock_recv(sock, 4096)  # the first bytes arrive; then the decode rank dies
        sock.close()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if side.server.failed_sends:
                break
        assert side.server.failed_sends == 1
        assert "req-1" in side.holds  # held until its timeout (the decode side may retry)
        clock.now = 5
        assert side.holds.expire() == ["req-1"]
        assert side.released == ["req-1"] and len(side.holds) == 0
    finally:
        await side.server.stop()


@pytest.mark.asyncio
async def test_duplicate_completion_over_the_wire_and_abort():
    side = Prefill(KvPlacement(2, 2, 8), "cross_layer", 20)
    await side.server.start()
    client = TcpKvClient(timeout=5)
    endpoint = ("127.0.0.1", side.server.port)
    try:
        side.holds.hold("req-1")
        expected = {(0, 0), (1, 1)}
        first = PullOrder("req-1", "p-0", 0, 0, expected, [], [])
        assert await client.done(endpoint, first) is False
        with pytest.raises(KvTransferError, match="already reported") as err:
            await client.done(endpoint, first)
        assert err.value.code == "duplicate"
        assert side.released == []
        await client.abort(endpoint, "req-1", "p-0")
        assert side.released == ["req-1"] and side.holds.stats.aborted == 1
        with pytest.raises(KvTransferError, match="no KV held"):
            await client.done(endpoint, PullOrder("req-1", "p-0", 1, 1, expected, [], []))
        assert side.released == ["req-1"]
    finally:
        await client.close()
        await side.server.stop()


@pytest.mark.asyncio
async def test_checksum_mode_verifies_bytes():
    side = Prefill(KvPlacement(2, 2, 8), "cross_layer", 33)
    await side.server.start()
    try:
        side.holds.hold("req-1")
        result, got, want = await run_pull(
            side, KvPlacement(2, 2, 8), "cross_layer", 33, client=TcpKvClient(checksum=True)
        )
    finally:
        await side.server.stop()
    assert got == want and result.released


@pytest.mark.asyncio
async def test_pooled_connections_to_a_restarted_prefill_are_replaced():
    """The decode side pools connections; when the prefill engine restarts on the same port
    every pooled one is dead. The next pull must open a new connection, not fail."""
    placement = KvPlacement(1, 2, 8)
    first = Prefill(placement, "cross_layer", 20)
    await first.server.start()
    client = TcpKvClient(timeout=5)
    close = client.close
    client.close = _keep_open  # run_pull closes its client; this one lives on
    port = first.server.port
    try:
        first.holds.hold("req-1")
        result, got, want = await run_pull(first, placement, "cross_layer", 20, client=client)
        assert got == want and result.released
        assert client._idle  # the connection is pooled
        await first.server.stop()
        again = Prefill(placement, "cross_layer", 20)
        again.server.port = port  # the restarted engine listens where the old one did
        await again.server.start()
        try:
            again.holds.hold("req-2")
            params = again.params("req-2")
            result, got, want = await run_pull(  # the client with the dead pooled connection
                again, placement, "cross_layer", 20, client=client, params=params
            )
            assert got == want and result.released
        finally:
            await again.server.stop()
    finally:
        await close()


async def _keep_open() -> None:
    return None
