"""KV-cache events on vLLM's wire (`--kv-events-config`): a ZMQ PUB socket sends
(topic, 8-byte big-endian sequence number, msgpack batch) frames, and an optional ROUTER socket
replays buffered batches from a sequence number, ending with sequence -1. A batch is
[timestamp, events, data-parallel rank]; vLLM 0.32 writes each event as a map tagged
`type: BlockStored | BlockRemoved | AllBlocksCleared`, older vLLM as an array whose first item
is the tag; `decode_batch` reads both.

The sim engine publishes with `KvEventPublisher`; the router follows engines with
`KvEventSubscriber`, which asks for a replay when a sequence number is skipped and reports an
engine restart (numbers going back) as everything cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .cache_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

log = logging.getLogger("ascend_runtime.kv.events")

END_SEQ = -1


def _wire(e: KvEvent) -> dict[str, Any]:
    """One event as vLLM 0.32 writes it: a map tagged `type`, with lora_id, medium and
    lora_name present even at their defaults."""
    if isinstance(e, BlockStored):
        return {"type": "BlockStored", "block_hashes": e.block_hashes,
                "parent_block_hash": e.parent_block_hash, "token_ids": e.token_ids,
                "block_size": e.block_size, "lora_id": None, "medium": "GPU",
                "lora_name": None}  # fmt: skip
    if isinstance(e, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": e.block_hashes, "medium": "GPU"}
    return {"type": "AllBlocksCleared"}


def encode_batch(events: list[KvEvent], data_parallel_rank: int | None = None) -> bytes:
    """One batch in vLLM's encoding: [ts, events] plus the data-parallel rank when known."""
    batch: list[Any] = [time.time(), [_wire(e) for e in events]]
    if data_parallel_rank is not None:
        batch.append(data_parallel_rank)
    return msgspec.msgpack.encode(batch)


def decode_batch(payload: bytes) -> tuple[float, list[KvEvent], int | None]:
    """(timestamp, events, data-parallel rank) of one batch, from any vLLM version's
    encoding; events of other kinds are skipped. Raises ValueError on a malformed batch."""
    try:
        raw = msgspec.msgpack.decode(payload)
        ts, items = float(raw[0]), raw[1]
        rank = raw[2] if len(raw) > 2 else None
        return ts, [e for e in map(_event, items) if e is not None], rank
    except (msgspec.DecodeError, TypeError, IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"not a KV event batch: {exc}") from None


def _event(item: Any) -> KvEvent | None:
    if isinstance(item, dict):
        kind, fields = item.get("type"), item
        get = fields.get
    elif isinstance(item, list) and item:
        kind, values = item[0], item[1:]
        names = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids",
                                 "block_size"), "BlockRemoved": ("block_hashes",)}  # fmt: skip
        fields = dict(zip(names.get(kind, ()), values, strict=False))
        get = fields.get
    else:
        return None
    if kind == "BlockStored":
        return BlockStored(
            list(get("block_hashes")), get("parent_block_hash"), list(get("token_ids") or []),
            int(get("block_size") or 0),
        )  # fmt: skip
    if kind == "BlockRemoved":
        return BlockRemoved(list(get("block_hashes")))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def _options(socket: zmq.Socket) -> None:
    """Every event socket: no linger on close, and IPv6 on, so a wildcard endpoint binds
    both families and `tcp://[addr]:port` connects on IPv6 and dual-stack clusters."""
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IPV6, 1)


class KvEventPublisher:
    """PUB + replay ROUTER for one engine, on the asyncio loop's thread. `add` collects
    events; `flush` sends them as one batch (the engine flushes once per step)."""

    def __init__(
        self, endpoint: str, replay_endpoint: str | None = None, *, topic: str = "",
        buffer_steps: int = 10_000, data_parallel_rank: int | None = None,
    ) -> None:  # fmt: skip
        self._ctx = zmq.asyncio.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        _options(self._pub)
        self._pub.bind(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            _options(self._replay)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = topic.encode()
        self._rank = data_parallel_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pending: list[KvEvent] = []
        self._seq = 0
        self._task: asyncio.Task[None] | None = None

    def add(self, event: KvEvent) -> None:
        self._pending.append(event)

    def flush(self) -> None:
        """Publish what was collected as one batch (never blocks: PUB drops at its HWM)."""
        if not self._pending:
            return
        payload = encode_batch(self._pending, self._rank)
        self._pending = []
        seq, self._seq = self._seq, self._seq + 1
        self._buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload],
                                     flags=zmq.NOBLOCK)  # fmt: skip

    def start(self) -> None:
        if self._replay is not None and self._task is None:
            self._task = asyncio.create_task(self._serve_replay(), name="kv-events-replay")

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                continue  # not a replay request
            client, _, start = frames
            first = int.from_bytes(start, "big", signed=True)
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart(
                        [client, b"", self._topic, seq.to_bytes(8, "big"), payload]
                    )
            await self._replay.send_multipart(
                [client, b"", b"", END_SEQ.to_bytes(8, "big", signed=True), b""]
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pub.close(0)
        if self._replay is not None:
            self._replay.close(0)


Apply = Callable[[list[KvEvent]], Awaitable[None] | None]


class KvEventSubscriber:
    """Follows one engine's events: `apply` gets each batch's events in order. Joining after
    the engine's first batch replays its buffer from the start; a skipped sequence number asks
    the replay endpoint for the gap (when there is none, the engine's state is unknown,
    reported as AllBlocksCleared); numbers going back mean the engine restarted:
    AllBlocksCleared first. ZMQ reconnects by itself."""

    def __init__(
        self, endpoint: str, apply: Apply, *, replay_endpoint: str | None = None,
        topic: str = "", replay_timeout: float = 2.0,
    ) -> None:  # fmt: skip
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self._apply, self._topic, self._timeout = apply, topic.encode(), replay_timeout
        self._ctx = zmq.asyncio.Context.instance()
        self.last_seq: int | None = None
        self.batches = self.gaps = self.restarts = self.malformed = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kv-events {self.endpoint}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        _options(sub)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        sub.connect(self.endpoint)
        lost = False
        try:
            await self._catch_up(sub)
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())["event"]
                    if event == zmq.EVENT_DISCONNECTED:
                        lost = True
                    elif event == zmq.EVENT_CONNECTED and lost:
                        # The engine went away and something listens again: a restarted
                        # engine keeps none of its cache (and may have published as many
                        # batches as the old one before we reconnected).
                        lost = False
                        await self._restarted(sub)
                if sub in ready:
                    frames = await sub.recv_multipart()
                    if len(frames) == 3:
                        await self._receive(int.from_bytes(frames[1], "big"), frames[2])
        finally:
            sub.disable_monitor()
            monitor.close(0)
            sub.close(0)

    async def _restarted(self, sub: zmq.asyncio.Socket) -> None:
        self.restarts += 1
        self.last_seq = None
        await self._deliver([AllBlocksCleared()])
        await self._catch_up(sub)

    async def _catch_up(self, sub: zmq.asyncio.Socket) -> None:
        """On joining, what the engine cached before: its replay buffer from the start (as
        far back as it reaches), so a new or restarted router knows it before the engine's
        next step. Batches the SUB socket queued meanwhile that the replay covered are
        dropped, not taken for an engine restart."""
        if not self.replay_endpoint:
            return
        got = await self._replay(0, None)
        if got == 0:
            return
        self.last_seq = got - 1
        while await sub.poll(0):
            frames = await sub.recv_multipart()
            seq = int.from_bytes(frames[1], "big") if len(frames) == 3 else -1
            if seq >= got:
                await self._receive(seq, frames[2])

    async def _receive(self, seq: int, payload: bytes) -> None:
        last = self.last_seq
        if last is None and seq > 0:
            # Joined late with no replay at start (PUB drops what came before the
            # subscription): take what the buffer still holds.
            await self._replay(0, seq)
        elif last is not None and seq <= last:  # restarted while we stayed connected
            self.restarts += 1
            await self._deliver([AllBlocksCleared()])
        elif last is not None and seq > last + 1:
            self.gaps += 1
            if await self._replay(last + 1, seq) < seq:
                await self._deliver([AllBlocksCleared()])
        self.last_seq = seq
        self.batches += 1
        try:
            _, events, _ = decode_batch(payload)
        except ValueError as exc:
            self.malformed += 1
            log.warning("%s: %s", self.endpoint, exc)
            return
        if events:
            await self._deliver(events)

    async def _deliver(self, events: list[KvEvent]) -> None:
        result = self._apply(events)
        if asyncio.iscoroutine(result):
            await result

    async def _replay(self, first: int, until: int | None) -> int:
        """Deliver batches first..until-1 (None: all the buffer holds) from the replay
        endpoint; the number after the last one delivered (`first` when none was)."""
        if not self.replay_endpoint:
            return first
        # DEALER with REQ's empty delimiter: the ROUTER answers with many messages, which a
        # REQ socket would drop after the first.
        req = self._ctx.socket(zmq.DEALER)
        _options(req)
        req.connect(self.replay_endpoint)
        got = first
        try:
            await req.send_multipart([b"", first.to_bytes(8, "big")])
            while True:
                if not await req.poll(self._timeout * 1000):
                    return got
                frames = await req.recv_multipart()
                if len(frames) < 3:
                    return got
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == END_SEQ:
                    return got
                if first == 0 and got == 0 and seq > 0 and (until is None or seq < until):
                    got = seq  # the buffer no longer reaches back to 0: take what it holds
                if seq == got and (until is None or seq < until):
                    _, events, _ = decode_batch(frames[-1])
                    await self._deliver(events)
                    got += 1
        except ValueError:
            return got
        finally:
            req.close(0)
