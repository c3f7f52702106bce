"""The built-in KV transport: asyncio over plain TCP sockets.

One request frame names every segment to read; the answer is one frame whose payload is those
segments back to back, so a whole request moves in one round trip per (decode rank, prefill
rank). Large segments go straight from the registered buffer to the socket and from the socket
into the destination buffer (no intermediate copy); small ones are batched.

Frame: magic ``ASKV``, u32 header length, u64 payload length, JSON header, payload.
Requests: ``read`` (segments, expected pairs), ``done`` (a pair finished), ``abort``, and
``describe`` (registered addresses, for the Mooncake transport that reads them itself).
Answers: ``{"ok": true, ...}`` or ``{"ok": false, "code": ..., "message": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

from .holds import Holds, KvTransferError
from .transfer import PullOrder, Region, Segment

log = logging.getLogger(__name__)

MAGIC = b"ASKV"
_HEAD = struct.Struct("!4sIQ")
DIRECT = 64 * 1024
"""Segments at least this large are sent and received in place; smaller ones are batched."""
BATCH = 1 << 20
THREADED = 4 << 20
"""Payloads at least this large move with blocking socket calls in a worker thread (they release
the GIL): one event-loop wake-up per socket-buffer-full halved loopback throughput on a 16-core
host, and the event loop stays free for other requests meanwhile."""
MAX_HEADER = 64 << 20


def _digest() -> Any:
    return hashlib.blake2b(digest_size=16)


async def _recv_into(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview
) -> None:
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionResetError(
                f"peer closed the connection after {got} of {len(view)} bytes"
            )
        got += n


async def _send_frame(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    header: dict[str, Any],
    payload_len: int = 0,
) -> None:
    body = json.dumps(header, separators=(",", ":")).encode()
    await loop.sock_sendall(sock, _HEAD.pack(MAGIC, len(body), payload_len) + body)


async def _recv_frame(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> tuple[dict[str, Any], int]:
    head = bytearray(_HEAD.size)
    await _recv_into(loop, sock, memoryview(head))
    magic, hlen, plen = _HEAD.unpack(head)
    if magic != MAGIC or hlen > MAX_HEADER:
        raise ConnectionError("not an ascend-serve KV transfer frame (wrong port or protocol?)")
    body = bytearray(hlen)
    await _recv_into(loop, sock, memoryview(body))
    return json.loads(body), plen


def _views(regions: dict[str, Region], segments: list[Segment], side: str) -> list[memoryview]:
    views = []
    for seg in segments:
        region = regions.get(seg.region)
        if region is None:
            raise KvTransferError("bad_segment", f"{side} has no region {seg.region!r}")
        if seg.offset < 0 or seg.length < 0 or seg.offset + seg.length > region.length:
            raise KvTransferError(
                "bad_segment",
                f"{side} segment {seg.offset}+{seg.length} is outside region {seg.region!r} "
                f"({region.length} bytes)",
            )
        views.append(region.view[seg.offset : seg.offset + seg.length])
    return views


class TcpKvServer:
    """Prefill side: serves reads of held requests' blocks and collects completions.

    `regions(rank)` gives the registered regions of a prefill rank this server serves (one
    server per rank in vLLM; the sim serves all of an instance's ranks from one port). With
    `ranks`, completion is tracked only for pairs of those prefill ranks (the others are
    other processes' business)."""

    def __init__(
        self,
        regions: Callable[[int], dict[str, Region]],
        holds: Holds,
        engine_id: str,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        ranks: set[int] | None = None,
    ):
        self.regions, self.holds, self.engine_id = regions, holds, engine_id
        self.ranks = ranks
        self.remote_memory: Callable[[int], tuple[str, dict[str, int]]] | None = None
        """Set when an RDMA-style engine (Mooncake) serves the bytes: rank -> (its session,
        region name -> registered address); `describe` hands these to decode ranks."""
        self.host, self.port = host, port
        self.bytes_sent = 0
        self.failed_sends = 0
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = socket.create_server((self.host, self.port), reuse_port=False, backlog=512)
        sock.setblocking(False)
        self._sock, self.port = sock, sock.getsockname()[1]
        self._accept = asyncio.create_task(self._accept_loop(), name="kv-tcp-accept")

    async def stop(self) -> None:
        for task in [self._accept, *self._conns]:
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._sock:
            self._sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            while True:
                try:
                    header, plen = await _recv_frame(loop, conn)
                except (ConnectionError, OSError, ValueError):
                    return
                if plen:
                    return  # requests carry no payload: not our protocol
                try:
                    await self._handle(loop, conn, header)
                except KvTransferError as exc:
                    try:
                        await _send_frame(
                            loop, conn, {"ok": False, "code": exc.code, "message": str(exc)}
                        )
                    except OSError:
                        return
                except OSError as exc:  # the reader went away mid-send: its hold times out
                    self.failed_sends += 1
                    log.warning("KV send to a decode rank failed: %r", exc)
                    return

    async def _handle(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, h: dict[str, Any]
    ) -> None:
        op, request_id = h.get("op"), str(h.get("request_id"))
        if h.get("engine_id") != self.engine_id:
            raise KvTransferError(
                "kv_not_found", f"this is prefill engine {self.engine_id}, not {h.get('engine_id')}"
            )
        if op == "read":
            self.holds.expect(request_id, self._expected(h["expected"]))
            segments = [Segment(*s) for s in h["segments"]]
            views = _views(self.regions(int(h["rank"])), segments, f"prefill rank {h['rank']}")
            total = sum(len(v) for v in views)
            reply: dict[str, Any] = {"ok": True, "bytes": total}
            if h.get("checksum"):
                digest = _digest()
                for v in views:
                    digest.update(v)
                reply["checksum"] = digest.hexdigest()
            await _send_frame(loop, conn, reply, total)
            if total >= THREADED:
                # a reader that stops reading must not hold a worker thread forever
                timeout = self.holds.timeout
                await asyncio.to_thread(_blocking(_send_views_blocking), conn, views, timeout)
            else:
                await _send_views(loop, conn, views)
            self.bytes_sent += total
        elif op == "done":
            if h.get("expected") is not None:
                self.holds.expect(request_id, self._expected(h["expected"]))
            released = self.holds.done(request_id, (int(h["rank"]), int(h["consumer"])))
            await _send_frame(loop, conn, {"ok": True, "released": released})
        elif op == "abort":
            await _send_frame(loop, conn, {"ok": True, "released": self.holds.abort(request_id)})
        elif op == "describe":
            if self.remote_memory is None:
                raise KvTransferError(
                    "unsupported", "this prefill engine serves KV over TCP only (transport tcp)"
                )
            self.holds.expect(request_id, self._expected(h["expected"]))
            rank = int(h["rank"])
            _views(self.regions(rank), [Segment(*s) for s in h["segments"]], f"prefill rank {rank}")
            session, addresses = self.remote_memory(rank)
            await _send_frame(loop, conn, {"ok": True, "session": session, "regions": addresses})
        else:
            raise KvTransferError("bad_request", f"unknown KV transfer op {op!r}")

    def _expected(self, pairs: list[list[int]]) -> list[tuple[int, int]]:
        return [(p, d) for p, d in pairs if self.ranks is None or p in self.ranks]


def _outgoing(views: list[memoryview]) -> Iterator[memoryview | bytearray]:
    """What to send, in order: large segments as they are, runs of small ones joined."""
    batch = bytearray()
    for v in views:
        if len(v) >= DIRECT:
            if batch:
                yield batch
                batch = bytearray()
            yield v
        else:
            batch += v
            if len(batch) >= BATCH:
                yield batch
                batch = bytearray()
    if batch:
        yield batch


def _incoming(views: list[memoryview]) -> Iterator[tuple[memoryview, list[memoryview]]]:
    """Where to receive, in order: (buffer, segments it scatters to). A large segment is its
    own buffer (received in place); a run of small ones shares a staging buffer."""
    i = 0
    while i < len(views):
        if len(views[i]) >= DIRECT:
            yield views[i], []
            i += 1
            continue
        j, size = i, 0
        while j < len(views) and len(views[j]) < DIRECT and size < BATCH:
            size += len(views[j])
            j += 1
        yield memoryview(bytearray(size)), views[i:j]
        i = j


def _scatter(staging: memoryview, targets: list[memoryview]) -> None:
    pos = 0
    for v in targets:
        v[:] = staging[pos : pos + len(v)]
        pos += len(v)


async def _send_views(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, views: list[memoryview]
) -> None:
    for piece in _outgoing(views):
        await loop.sock_sendall(conn, piece)


class TcpKvClient:
    """Decode side: pooled connections to prefill ranks; implements KvTransport."""

    def __init__(self, timeout: float = 30.0, checksum: bool = False):
        self.timeout, self.checksum = timeout, checksum
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self.bytes_received = 0

    async def _connect(self, endpoint: tuple[str, int]) -> tuple[socket.socket, bool]:
        """A connection to `endpoint`, and whether it is a pooled one (it may be dead)."""
        idle = self._idle.get(endpoint)
        if idle:
            return idle.pop(), True
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, endpoint)
        except OSError:
            sock.close()
            raise
        return sock, False

    def _drop_idle(self, endpoint: tuple[str, int]) -> None:
        for idle in self._idle.pop(endpoint, []):
            idle.close()

    async def _exchange(
        self, endpoint: tuple[str, int], header: dict[str, Any], what: str,
        receive: Callable[[asyncio.AbstractEventLoop, socket.socket, dict[str, Any], int], Any]
        | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        loop = asyncio.get_running_loop()
        where = f"prefill engine {header['engine_id']} rank {header.get('rank', '?')} at " \
            f"{endpoint[0]}:{endpoint[1]}"  # fmt: skip
        sock: socket.socket | None = None

        async def run() -> dict[str, Any]:
            nonlocal sock
            sock, reused = await self._connect(endpoint)
            try:
                await _send_frame(loop, sock, header)
                reply, plen = await _recv_frame(loop, sock)
            except (ConnectionError, OSError):
                if not reused:
                    raise
                # A pooled connection the peer has closed (the prefill engine restarted, or
                # dropped idle connections): the request never arrived. Drop every pooled
                # connection to that peer and ask once more on a new one.
                sock.close()
                self._drop_idle(endpoint)
                sock, _ = await self._connect(endpoint)
                await _send_frame(loop, sock, header)
                reply, plen = await _recv_frame(loop, sock)
            if not reply.get("ok"):
                self._idle.setdefault(endpoint, []).append(sock)
                sock = None
                raise KvTransferError(
                    str(reply.get("code")), f"{where} refused the {what}: {reply.get('message')}"
                )
            if receive is not None:
                await receive(loop, sock, reply, plen)
            self._idle.setdefault(endpoint, []).append(sock)
            sock = None
            return reply

        try:
            return await asyncio.wait_for(run(), self.timeout)
        except TimeoutError as exc:
            raise KvTransferError(
                "timeout", f"{what} from {where} took longer than {self.timeout:g} s"
            ) from exc
        except (ConnectionError, OSError) as exc:
            raise KvTransferError("connection_lost", f"{what} from {where} failed: {exc}") from exc
        finally:
            if sock is not None:  # broken mid-exchange: never reuse it; wake a blocked thread
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    async def read(
        self, endpoint: tuple[str, int], order: PullOrder, local: dict[str, Region]
    ) -> int:
        views = _views(local, order.writes, f"decode rank {order.consumer}")
        if [len(v) for v in views] != [s.length for s in order.reads]:
            raise ValueError("read and write segments of a pull must be index-aligned")
        header = _order_header("read", order, segments=True) | {"checksum": self.checksum}

        async def receive(
            loop: asyncio.AbstractEventLoop, sock: socket.socket, reply: dict[str, Any], plen: int
        ) -> None:
            if plen != order.nbytes:
                raise KvTransferError(
                    "bad_reply", f"expected {order.nbytes} bytes of KV, the sender announced {plen}"
                )
            if plen >= THREADED:
                await asyncio.to_thread(_blocking(_recv_views_blocking), sock, views, None)
            else:
                await _recv_views(loop, sock, views)
            if self.checksum:
                digest = _digest()
                for v in views:
                    digest.update(v)
                if digest.hexdigest() != reply.get("checksum"):
                    raise KvTransferError("checksum", "KV bytes failed their checksum")

        await self._exchange(endpoint, header, "KV read", receive)
        self.bytes_received += order.nbytes
        return order.nbytes

    async def done(self, endpoint: tuple[str, int], order: PullOrder) -> bool:
        header = _order_header("done", order)
        reply = await self._exchange(endpoint, header, "KV completion")
        return bool(reply.get("released"))

    async def describe(self, endpoint: tuple[str, int], order: PullOrder) -> dict[str, Any]:
        """Where a prefill rank's regions live for a one-sided engine to read them: checks the
        request is held and the segments are in bounds, like a read, but moves no bytes."""
        header = _order_header("describe", order, segments=True)
        return await self._exchange(endpoint, header, "KV address lookup")

    async def abort(self, endpoint: tuple[str, int], request_id: str, engine_id: str) -> None:
        header = {"op": "abort", "request_id": request_id, "engine_id": engine_id}
        await self._exchange(endpoint, header, "KV abort")

    async def close(self) -> None:
        for socks in self._idle.values():
            for s in socks:
                s.close()
        self._idle.clear()


def _order_header(op: str, order: PullOrder, *, segments: bool = False) -> dict[str, Any]:
    header: dict[str, Any] = {
        "op": op,
        "request_id": order.request_id,
        "engine_id": order.engine_id,
        "rank": order.rank,
        "consumer": order.consumer,
        "expected": sorted(order.expected),
    }
    if segments:
        header["segments"] = [[s.region, s.offset, s.length] for s in order.reads]
    return header


async def _recv_views(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, views: list[memoryview]
) -> None:
    for buf, targets in _incoming(views):
        await _recv_into(loop, sock, buf)
        _scatter(buf, targets)


def _blocking(fn: Callable[..., None]) -> Callable[..., None]:
    """Run fn(sock, views) with the socket in blocking mode, then put it back to non-blocking
    for the event loop. No Python-level socket timeout: that polls before every call, which
    cost a third of loopback throughput. A send gives up after `timeout` seconds without
    progress through the kernel's SO_SNDTIMEO; a receive is bounded by the caller (asyncio),
    which shuts the socket down to wake the blocked thread."""

    def run(sock: socket.socket, views: list[memoryview], timeout: float | None) -> None:
        sock.setblocking(True)
        if timeout is not None:
            seconds = int(timeout)
            micros = int((timeout - seconds) * 1e6)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros)
            )
        try:
            fn(sock, views)
        finally:
            sock.setblocking(False)

    return run


def _send_views_blocking(sock: socket.socket, views: list[memoryview]) -> None:
    for piece in _outgoing(views):
        sock.sendall(piece)


def _recv_views_blocking(sock: socket.socket, views: list[memoryview]) -> None:
    for buf, targets in _incoming(views):
        got = 0
        while got < len(buf):
            n = sock.recv_into(buf[got:])
            if n == 0:
                raise ConnectionResetError(
                    f"peer closed the connection after {got} of {len(buf)} bytes"
                )
            got += n
        _scatter(buf, targets)
