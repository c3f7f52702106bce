"""KV transport on Mooncake's transfer engine (`mooncake-transfer-engine`), when installed.

Mooncake moves the bytes one-sided (RDMA, Ascend's HCCS/RoCE via ascend_direct, or its TCP
protocol); ascend-serve's TCP protocol stays the control plane: `describe` checks the hold and
bounds and returns the prefill rank's Mooncake session and registered addresses, and `done` /
`abort` drive the same `Holds` as the TCP transport. So completion, timeouts and aborts behave
identically whichever engine moves the bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from .holds import KvTransferError
from .tcp import TcpKvClient, TcpKvServer
from .transfer import PullOrder, Region


class OneSidedEngine(Protocol):
    """What the transport needs from a one-sided engine (MooncakeEngine in production)."""

    session: str

    def register(self, regions: dict[str, Region]) -> None: ...

    def read(
        self, session: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]
    ) -> None: ...


class MooncakeEngine:
    """One process's Mooncake TransferEngine, in peer-to-peer handshake mode (no metadata
    server): its session is "host:rpc_port"."""

    def __init__(self, host: str, protocol: str = "tcp", device_name: str = ""):
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise RuntimeError(
                "transport mooncake needs the mooncake-transfer-engine package and its native "
                f"libraries ({exc}); install it in the runtime image or use transport tcp"
            ) from exc
        self.engine = TransferEngine()
        rc = self.engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise RuntimeError(
                f"Mooncake TransferEngine.initialize({host!r}, P2PHANDSHAKE, {protocol!r}) "
                f"returned {rc}"
            )
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self._registered: set[int] = set()

    def register(self, regions: dict[str, Region]) -> None:
        todo = [r for r in regions.values() if r.length and r.address not in self._registered]
        if not todo:
            return
        rc = self.engine.batch_register_memory([r.address for r in todo], [r.length for r in todo])
        if rc != 0:
            raise RuntimeError(f"Mooncake could not register {len(todo)} KV regions (rc {rc})")
        self._registered.update(r.address for r in todo)

    def read(
        self, session: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]
    ) -> None:
        rc = self.engine.batch_transfer_sync_read(session, list(local), list(remote), list(lengths))
        if rc < 0:
            raise KvTransferError("transfer_failed", f"Mooncake read from {session} returned {rc}")


def serve_registered(server: TcpKvServer, engine: OneSidedEngine) -> None:
    """Let decode ranks read `server`'s regions through `engine` (registering them)."""

    def remote_memory(rank: int) -> tuple[str, dict[str, int]]:
        regions = server.regions(rank)
        engine.register(regions)
        return engine.session, {name: r.address for name, r in regions.items()}

    server.remote_memory = remote_memory


class MooncakeKvTransport:
    """Decode side: addresses over the control connection, bytes through the engine."""

    def __init__(self, engine: OneSidedEngine, control: TcpKvClient):
        self.engine, self.control = engine, control
        self.bytes_received = 0

    async def read(
        self, endpoint: tuple[str, int], order: PullOrder, local: dict[str, Region]
    ) -> int:
        reply = await self.control.describe(endpoint, order)
        remote: dict[str, Any] = reply["regions"]
        self.engine.register(local)
        lp, rp, ln = [], [], []
        for src, dst in zip(order.reads, order.writes, strict=True):
            if src.length != dst.length:
                raise ValueError("read and write segments of a pull must be index-aligned")
            if dst.region not in local or src.region not in remote:
                raise KvTransferError("bad_segment", f"no region {src.region!r} on both sides")
            if dst.offset + dst.length > local[dst.region].length:
                raise KvTransferError(
                    "bad_segment", f"decode segment {dst.offset}+{dst.length} outside {dst.region}"
                )
            lp.append(local[dst.region].address + dst.offset)
            rp.append(int(remote[src.region]) + src.offset)
            ln.append(src.length)
        if ln:
            await asyncio.to_thread(self.engine.read, str(reply["session"]), lp, rp, ln)
        self.bytes_received += order.nbytes
        return order.nbytes

    async def done(self, endpoint: tuple[str, int], order: PullOrder) -> bool:
        return await self.control.done(endpoint, order)

    async def abort(self, endpoint: tuple[str, int], request_id: str, engine_id: str) -> None:
        await self.control.abort(endpoint, request_id, engine_id)

    async def close(self) -> None:
        await self.control.close()
