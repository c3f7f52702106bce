"""Worker side of the connector: one rank's staging, serving and pulling.

vLLM calls a worker synchronously from its model runner; transfers run on an asyncio loop in
a daemon thread (`LoopThread`), so pulls overlap the forward passes and the prefill rank's
server answers while the rank computes.

Prefill rank: `save` copies a finished prompt's blocks to the host stage and holds them;
its `TcpKvServer` serves reads and collects each decode rank's "done"; when the hold is
released (all done, timeout, abort) the request is reported by `finished` as sent, and vLLM
frees its blocks. Decode rank: `load` starts `kv.pull` for this rank's share; `finished`
copies completed pulls into the device caches and reports them received. A failed pull
reports the request too, with its blocks in `load_errors` (vLLM then recomputes them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..holds import Holds, KvTransferError
from ..mooncake import MooncakeEngine, MooncakeKvTransport, serve_registered
from ..pull import pull, remote_side
from ..rank_map import prefill_endpoint
from ..tcp import TcpKvClient, TcpKvServer
from ..transfer import KvTransport
from .caches import DeviceKv, HostStage
from .scheduler import LoadReq, PdMeta, SaveReq
from .settings import ConnectorSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a plain function on the loop's thread and return its result."""

        async def call() -> Any:
            return fn(*args)

        return self.run(call())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class _Load:
    req: LoadReq
    future: concurrent.futures.Future[Any]


class PdWorker:
    """The connector in one rank's process."""

    def __init__(
        self,
        settings: ConnectorSettings,
        rank: int,
        device: DeviceKv,
        transport: KvTransport | None = None,
    ):
        self.settings, self.rank = settings, rank
        self.placement = settings.placement()
        if not 0 <= rank < self.placement.ranks:
            raise ValueError(f"rank {rank} is outside this instance's {self.placement.ranks}")
        if device.spec.num_blocks != settings.num_blocks:
            split = ""
            if device.spec.num_blocks % settings.num_blocks == 0:
                split = (
                    f" (the attention kernel splits each {settings.block_size}-token block "
                    f"into {device.spec.num_blocks // settings.num_blocks}: set --block-size "
                    f"to the kernel's {device.spec.block_size})"
                )
            raise ValueError(
                f"the engine registered {device.spec.num_blocks} KV blocks but the scheduler "
                f"plans with {settings.num_blocks}{split}"
            )
        if device.spec.heads != self.placement.heads_per_rank:
            raise ValueError(
                f"rank {rank} caches {device.spec.heads} KV heads but TP {settings.tp} over "
                f"{settings.kv_heads} heads gives {self.placement.heads_per_rank} per rank"
            )
        engine = MooncakeEngine(settings.host) if settings.transport == "mooncake" else None
        self.stage = HostStage(device, settings.layout)
        self.packed = device.packed
        self.loop = LoopThread(f"kv-connector-{rank}")
        self._lock = threading.Lock()
        self._saved: set[str] = set()
        """Requests staged and held here, until reported sent (model-runner thread only)."""
        self._sent: set[str] = set()
        self._finished_seen: set[str] = set()
        self._loads: dict[str, _Load] = {}
        self._errors: set[int] = set()
        self.holds: Holds | None = None
        self.server: TcpKvServer | None = None
        self.transport = transport
        self._reaper: concurrent.futures.Future[Any] | None = None
        self._closed = False
        if settings.produces:
            self.holds = Holds(self._released, settings.timeout)
            self.server = TcpKvServer(
                self._regions,
                self.holds,
                settings.engine_id,
                "0.0.0.0",
                settings.rank_port(rank),
                ranks={rank},
            )
            if engine is not None:
                serve_registered(self.server, engine)
            self.loop.run(self.server.start())
            self._reaper = self.loop.submit(self._reap())
        if self.transport is None and settings.consumes:
            client = TcpKvClient(timeout=settings.timeout, checksum=settings.checksum)
            self.transport = client if engine is None else MooncakeKvTransport(engine, client)

    @property
    def port(self) -> int | None:
        return self.server.port if self.server else None

    def _regions(self, rank: int) -> dict[str, Any]:
        if rank != self.rank:
            raise KvTransferError(
                "wrong_rank", f"this port serves prefill rank {self.rank}, not rank {rank}"
            )
        return self.stage.regions

    # ------------------------------------------------------------------ per step

    def start(self, meta: PdMeta) -> None:
        """Before the forward pass: releases, aborts, and this step's loads."""
        for request_id in meta.releases:
            if self.holds is not None:
                self.loop.call(self.holds.abort, request_id)
            # vLLM freed these blocks itself (no delayed free): never report them as sent
            self._saved.discard(request_id)
            self._finished_seen.discard(request_id)
            with self._lock:
                self._sent.discard(request_id)
        if self.rank == 0:  # one decode rank tells every prefill rank
            for params in meta.aborts:
                self.loop.submit(self._abort_remote(params))
        for req in meta.loads:
            future = self.loop.submit(self._pull(req))
            self._loads[req.request_id] = _Load(req, future)

    def save(self, meta: PdMeta) -> None:
        """After the forward pass: stage and hold the prompts that completed in it."""
        for req in meta.saves:
            self._save(req)

    def _save(self, req: SaveReq) -> None:
        assert self.holds is not None
        needed = self.placement.blocks_needed(req.num_tokens)
        blocks = list(req.block_ids[:needed])
        self.stage.to_host(blocks)
        self.loop.call(self.holds.hold, req.request_id)
        self._saved.add(req.request_id)

    def finished(self, finished_ids: Iterable[str]) -> tuple[set[str], set[str]]:
        """(requests whose KV was sent and may be freed, requests whose KV arrived)."""
        # Only requests held here can be reported; other ids (every request vLLM finishes)
        # must not pile up.
        self._finished_seen.update(i for i in finished_ids if i in self._saved)
        with self._lock:
            sent = self._sent & self._finished_seen
            self._sent -= sent
        self._finished_seen -= sent
        self._saved -= sent
        received: set[str] = set()
        for request_id, load in list(self._loads.items()):
            if not load.future.done():
                continue
            del self._loads[request_id]
            exc = load.future.exception()
            blocks = list(load.req.block_ids[load.req.skip_blocks :])
            if exc is None:
                self.stage.to_device(blocks)
            else:
                log.warning("KV load of request %s failed: %s", request_id, exc)
                self._errors.update(blocks)
            received.add(request_id)
        return sent, received

    def load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def close(self) -> None:
        """Stop serving and pulling; held KV is released. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.loop.run(self.server.stop(), timeout=5)
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.loop.run(self.transport.close(), timeout=5)
        if self.holds is not None:
            self.loop.call(self.holds.release_all)
        self.loop.stop()

    # ------------------------------------------------------------------ on the loop

    def _released(self, request_id: str) -> None:
        with self._lock:
            self._sent.add(request_id)

    async def _reap(self) -> None:
        assert self.holds is not None
        while True:
            await asyncio.sleep(min(1.0, self.settings.timeout / 4))
            self.holds.expire()

    def _transfer_tokens(self, req: LoadReq) -> int:
        """Tokens to move: whole blocks where both sides place tokens alike (the last block's
        unused rows travel too), else exactly the prompt, which packed caches cannot do."""
        remote, _ = remote_side(req.params, self.placement, self.stage.layout)
        if remote.same_token_placement(self.placement):
            return self.placement.whole_block_tokens(req.num_tokens)
        if self.packed:
            raise KvTransferError(
                "bad_params",
                f"the prefill side uses block size {remote.block_size}, PCP {remote.pcp}, DCP "
                f"{remote.dcp}, interleave {remote.interleave} but this side "
                f"{self.placement.block_size}, {self.placement.pcp}, {self.placement.dcp}, "
                f"{self.placement.interleave}: this engine packs K and V inside its blocks, so "
                "only whole blocks can move; give both roles the same block size and context "
                "parallelism",
            )
        return req.num_tokens

    async def _pull(self, req: LoadReq) -> None:
        assert self.transport is not None
        await pull(
            self.transport,
            req.params,
            local=self.placement,
            local_layout=self.stage.layout,
            dst_blocks=list(req.block_ids),
            regions=lambda _rank: self.stage.regions,
            num_tokens=self._transfer_tokens(req),
            ranks=[self.rank],
            skip_dst_blocks=req.skip_blocks,
        )

    async def _abort_remote(self, params: Any) -> None:
        """Tell every prefill rank this decode rank would have read from to free the request."""
        if self.transport is None:
            return
        request_id = str(params.get("remote_request_id", ""))
        engine_id = str(params.get("remote_engine_id", ""))
        try:
            remote, _ = remote_side(params, self.placement, self.stage.layout)
            endpoints = {prefill_endpoint(params, remote, p) for p in range(remote.ranks)}
        except (KvTransferError, ValueError, KeyError) as exc:
            log.warning("cannot tell the prefill side to free request %s: %s", request_id, exc)
            return
        for endpoint in endpoints:
            with contextlib.suppress(KvTransferError, OSError):
                await self.transport.abort(endpoint, request_id, engine_id)
