"""Sending one request to one instance of a role: retries before the first byte, the
bounded waits, and the relay of a stream with its end-of-stream error event."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from fastapi.responses import Response

from ..config import RouterConfig
from ..openai import SSE_DONE, OpenAIError, sse
from .kv_routing import Affinity, KvRouting
from .metrics import RouterMetrics
from .pool import Backend, Pool
from .relay import RelayResponse
from .upstream import (
    UPSTREAM_ERRORS,
    StreamWatch,
    Upstream,
    UpstreamError,
    WatchedStream,
    before_first_byte,
    describe,
)


class Forwarder:
    """The request path from the router to the engines (the pool's FailurePolicy records
    every success and failure)."""

    def __init__(self, config: RouterConfig, pool: Pool, metrics: RouterMetrics):
        self.config, self.pool, self.metrics = config, pool, metrics
        self.failures = pool.failures
        self.upstream = Upstream()
        self.watch = StreamWatch(config.inter_token_timeout_seconds)
        self.kv: KvRouting | None = None
        """Policy kv-aware, when the router runs it."""

    async def start(self) -> None:
        await self.upstream.start()
        self.watch.start()

    async def stop(self) -> None:
        await self.watch.stop()
        await self.upstream.close()

    async def forward(
        self, role: str, route: str, payload: bytes | str, stream: bool, request_id: str, *,
        attempts: int | None = None, tried: set[str] | None = None,
        affinity: Affinity | None = None,
    ) -> Response:  # fmt: skip
        """Send to one instance of `role`; a failure before the first byte reaches the client
        is retried (another instance when there is one, on a fresh connection), up to
        `attempts` in all. `tried` collects the instances used (and avoids those already in
        it); `affinity` is the request's kv-aware placement. Raises OpenAIError 503 when
        every attempt failed."""
        tried = set() if tried is None else tried
        last_error = f"no {role} instance is available"
        if attempts is None:
            attempts = 1 + self.failures.retries_before_first_byte
        for attempt in range(attempts):
            backend = self.pool.pick(role, tried, affinity) or (
                self.pool.pick(role, frozenset(), affinity) if tried else None
            )
            if backend is None:
                break
            if not backend.available:
                self.metrics.fallbacks.labels(role).inc()
            if attempt:
                self.metrics.retries.labels(role).inc()
            tried.add(backend.url)
            try:
                if stream:
                    return await self._open_stream(
                        backend, route, payload, request_id, attempt > 0,
                        on_end=affinity.finish if affinity is not None else None,
                    )  # fmt: skip
                try:
                    status, media, content = await self.exchange(
                        backend, route, payload, request_id, fresh=attempt > 0,
                        timeout=self.config.request_timeout_seconds,
                    )  # fmt: skip
                finally:
                    if affinity is not None:
                        affinity.finish()
                return Response(content, status_code=status, media_type=media)
            except UpstreamError as exc:
                last_error = str(exc)
                self.metrics.errors.labels(exc.kind, role).inc()
                self.failures.failed(backend, last_error, definitive=exc.definitive)
            finally:  # the first token (or the answer, or a failure) is back
                if affinity is not None:
                    affinity.settle()
        raise OpenAIError(503, f"{role}: {last_error}", type_="upstream_error")

    async def exchange(
        self, backend: Backend, route: str, payload: bytes | str, request_id: str, *,
        fresh: bool, timeout: float,
    ) -> tuple[int, str | None, bytes]:  # fmt: skip
        """A whole non-streamed exchange: (status, content type, body)."""

        async def run() -> tuple[int, str | None, bytes]:
            response = await self.upstream.post(backend, route, payload, request_id, fresh)
            async with response:
                return response.status, response.headers.get("content-type"), await response.read()

        backend.outstanding += 1
        backend.served += 1
        start = time.perf_counter()
        try:
            result = await before_first_byte(backend, run(), timeout, "the response")
        finally:
            backend.outstanding -= 1
        self.metrics.upstream.labels(backend.role, backend.url).observe(time.perf_counter() - start)
        self.failures.succeeded(backend)
        return result

    async def _open_stream(
        self, backend: Backend, route: str, payload: bytes | str, request_id: str, fresh: bool,
        *, on_end: Callable[[], None] | None = None,
    ) -> Response:  # fmt: skip
        """Wait for the engine's first chunk (retryable until then), then relay the rest;
        `on_end` runs once the request is over on this instance (or has failed here)."""
        timeout = self.config.first_token_timeout_seconds
        backend.outstanding += 1
        backend.served += 1
        start = time.perf_counter()
        upstream: aiohttp.ClientResponse | None = None
        handed_off = False
        try:
            upstream = await before_first_byte(
                backend,
                self.upstream.post(backend, route, payload, request_id, fresh),
                timeout,
                "the response",
            )
            self.metrics.upstream.labels(backend.role, backend.url).observe(
                time.perf_counter() - start
            )
            if upstream.status != 200:
                content = await before_first_byte(backend, upstream.read(), timeout, "the error")
                self.failures.succeeded(backend)
                return Response(
                    content,
                    status_code=upstream.status,
                    media_type=upstream.headers.get("content-type"),
                )
            first = await before_first_byte(
                backend, upstream.content.readany(), timeout, "the first token"
            )
            if not first:
                raise UpstreamError(
                    f"{backend.url} ended the stream before sending anything", "broken"
                )
            self.metrics.ttft.observe(time.perf_counter() - start)
            handed_off = True
            return RelayResponse(
                self._relay(upstream, backend, first, on_end), media_type="text/event-stream"
            )
        finally:
            if not handed_off:
                backend.outstanding -= 1
                if upstream is not None:
                    upstream.close()
                if on_end is not None:
                    on_end()

    async def _relay(
        self, upstream: aiohttp.ClientResponse, backend: Backend, first: bytes,
        on_end: Callable[[], None] | None = None,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        """Pass the rest of an SSE stream through chunk by chunk. A stream that ends early
        (the engine died, went quiet past the inter-token timeout, or was ejected) gets an
        error event and [DONE]; a client that leaves closes the upstream connection, which
        aborts the request in the engine. A complete stream keeps its connection alive."""
        watched = WatchedStream(backend, upstream)
        self.watch.streams.add(watched)
        complete = False
        try:
            yield first
            try:
                async for chunk in upstream.content.iter_any():
                    watched.last_chunk = time.monotonic()
                    yield chunk
                if watched.cut:
                    raise aiohttp.ClientConnectionError(watched.cut)
                complete = True
            except UPSTREAM_ERRORS as exc:
                reason = watched.cut or describe(exc)
                self.metrics.errors.labels("stream", backend.role).inc()
                if not watched.cut:
                    self.failures.failed(backend, f"stream broke: {reason}")
                yield sse(
                    OpenAIError(
                        502,
                        f"{backend.role} instance {backend.url} failed mid-stream: {reason}; "
                        "the response is incomplete",
                        type_="upstream_error",
                    ).body()
                )
                yield SSE_DONE
                return
            self.failures.succeeded(backend)
        finally:
            self.watch.streams.discard(watched)
            backend.outstanding -= 1
            if on_end is not None:
                on_end()
            if complete:
                upstream.release()
            else:
                upstream.close()

    # ------------------------------------------------------------------ app
