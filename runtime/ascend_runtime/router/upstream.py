"""Talking to engine instances: pooled and fresh connections, the wait for the first byte
(bounded, and cut short when the instance is ejected), and the watch over streams in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from .policy import EJECTED, UPSTREAM_KEEPALIVE_SECONDS, Backend

T = TypeVar("T")

UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class UpstreamError(Exception):
    """An instance failed a request before anything reached the client."""

    def __init__(self, message: str, kind: str, *, definitive: bool = False):
        super().__init__(message)
        self.kind = kind
        """connect, timeout, ejected or broken (the `kind` label of the errors metric)."""
        self.definitive = definitive
        """Nothing is listening there (connection refused): eject at once."""


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Upstream:
    """The router's HTTP clients: one pooled session (idle connections kept below the engines'
    keep-alive), and one that opens a fresh connection per request, for retries."""

    def __init__(self, connect_timeout: float = 5.0):
        self.connect_timeout = connect_timeout
        self.pooled: aiohttp.ClientSession | None = None
        self.fresh: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        self.pooled = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS),
            timeout=timeout,
            json_serialize=dumps,
        )
        self.fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=timeout,
            json_serialize=dumps,
        )

    async def close(self) -> None:
        for session in (self.pooled, self.fresh):
            if session is not None:
                await session.close()

    def session(self, fresh: bool) -> aiohttp.ClientSession:
        session = self.fresh if fresh else self.pooled
        if session is None:
            raise RuntimeError("Upstream.start() has not run")
        return session

    async def post(
        self, backend: Backend, route: str, payload: bytes | str, request_id: str, fresh: bool
    ) -> aiohttp.ClientResponse:
        """Send a request; the response's headers are in (the body may not be)."""
        try:
            return await self.session(fresh).post(
                f"{backend.url}{route}",
                data=payload,
                headers={"x-request-id": request_id, "content-type": "application/json"},
            )
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                f"cannot connect to {backend.url}: {describe(exc)}", "connect", definitive=True
            ) from exc


async def before_first_byte(backend: Backend, work: Awaitable[T], timeout: float, what: str) -> T:
    """Await `work` for at most `timeout` seconds, and no longer than the instance stays in
    rotation (a frozen engine is ejected by its failing health checks; its requests should not
    wait for the timeout). Failures become UpstreamError, retryable elsewhere.

    The wait runs in the caller's task (no task per request: this is the hot path); ejection
    cancels the waiting tasks with the EJECTED message, which is told apart from any other
    cancellation here."""
    task = asyncio.current_task()
    assert task is not None
    backend.waiters.add(task)
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await work
    except asyncio.CancelledError as exc:
        if exc.args != (EJECTED,):
            raise
        task.uncancel()
        raise UpstreamError(
            f"{backend.url} was taken out of rotation: {backend.last_error}", "ejected"
        ) from None
    except UpstreamError:
        raise
    except UPSTREAM_ERRORS as exc:
        if deadline.expired():
            raise UpstreamError(
                f"{what} from {backend.url} took longer than {timeout:g} s", "timeout"
            ) from None
        raise UpstreamError(f"{what} from {backend.url} failed: {describe(exc)}", "broken") from exc
    finally:
        backend.waiters.discard(task)


@dataclass(eq=False)
class WatchedStream:
    """A stream being relayed: the time of its last chunk and the connection to cut."""

    backend: Backend
    response: aiohttp.ClientResponse
    last_chunk: float = field(default_factory=time.monotonic)
    cut: str | None = None
    """Why the watch ended the stream (None: it did not)."""


class StreamWatch:
    """Ends streams whose engine went quiet for longer than the inter-token timeout, or whose
    instance was ejected: one sweep a second, instead of a timer per chunk."""

    def __init__(self, inter_token_timeout: float, period: float = 1.0):
        self.inter_token_timeout, self.period = inter_token_timeout, period
        self.streams: set[WatchedStream] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="router-stream-watch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def sweep(self, now: float | None = None) -> int:
        """Cut every stream that should end; the number cut."""
        now = time.monotonic() if now is None else now
        cut = 0
        for stream in list(self.streams):
            if stream.cut is not None:
                continue
            if stream.backend.ejected:
                stream.cut = f"the instance was taken out of rotation ({stream.backend.last_error})"
            elif now - stream.last_chunk > self.inter_token_timeout:
                stream.cut = f"no token for {self.inter_token_timeout:g} s"
            else:
                continue
            stream.response.close()
            cut += 1
        return cut

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            self.sweep()
