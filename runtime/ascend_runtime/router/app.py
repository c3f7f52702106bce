"""The router: OpenAI front door that balances unified instances, or routes each request to a
prefill instance and then a decode instance (PD disaggregation, Mooncake's proxy flow)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import pathlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..config import RouterConfig
from ..openai import SSE_DONE, OpenAIError, read_json_object, sse
from .membership import Membership
from .pool import Backend, HealthChecker, Pool

PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""The kv_transfer_params of a prefill request: vLLM's PD convention (hold the KV for a remote
decode; the prefill engine fills in where it lives)."""

log = logging.getLogger("ascend_runtime.router")

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "ascend_serve_router_requests", "Requests answered.", ["route", "code"], registry=r
        )
        self.errors = Counter(
            "ascend_serve_router_errors", "Upstream failures by kind.", ["kind", "role"], registry=r
        )
        self.retries = Counter(
            "ascend_serve_router_retries",
            "Requests retried on another instance.",
            ["role"],
            registry=r,
        )
        self.inflight = Gauge(
            "ascend_serve_router_inflight_requests", "Requests in flight.", registry=r
        )
        self.ttft = Histogram(
            "ascend_serve_router_time_to_first_token_seconds",
            "Time to the first streamed byte (client view).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "ascend_serve_router_upstream_latency_seconds",
            "Upstream response time (headers) per instance.",
            ["role", "instance"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._requests: dict[tuple[str, str], Any] = {}
        self.healthy = Gauge(
            "ascend_serve_router_healthy_instances", "Instances in rotation.", ["role"], registry=r
        )

    def request_done(self, route: str, code: int) -> None:
        key = (route, str(code))
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()


class Router:
    """Request handling; the FastAPI app is `Router.app`."""

    def __init__(
        self, config: RouterConfig, pool: Pool | None = None, health_interval: float = 2.0
    ):
        self.config = config
        self.pool = pool or Pool(policy=config.policy)
        self.metrics = RouterMetrics()
        # aiohttp, not httpx, for the hot path: measured on a 2-core machine, httpx's pool
        # served 164 req/s at 64 concurrent requests where aiohttp served 3270.
        self.session: aiohttp.ClientSession | None = None
        self.health_interval = health_interval
        self.health: HealthChecker | None = None
        self.membership = Membership(config.backends, self.pool)
        self.slots = asyncio.Semaphore(config.max_concurrent_requests)
        self.api_keys = self._load_keys()
        self.app = self._build_app()

    def _load_keys(self) -> set[str]:
        if not self.config.api_keys_file:
            return set()
        text = pathlib.Path(self.config.api_keys_file).read_text(encoding="utf-8")
        keys = {line.strip() for line in text.splitlines() if line.strip()}
        if not keys:
            raise ValueError(f"{self.config.api_keys_file} lists no API keys")
        return keys

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=5.0, sock_read=self.config.request_timeout_seconds
            ),
            json_serialize=_dumps,
        )
        self.health = HealthChecker(self.pool, self.session, self.health_interval)
        await self.membership.start()
        await self.health.check_all()
        self.health.start()

    async def stop(self) -> None:
        if self.health:
            await self.health.stop()
        await self.membership.stop()
        if self.session:
            await self.session.close()

    @property
    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("Router.start() has not run")
        return self.session

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.config.mode == "pd" else ("unified",)

    # ------------------------------------------------------------------ request handling

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token, key) for key in self.api_keys):
            raise OpenAIError(
                401,
                "invalid or missing API key (Authorization: Bearer <key>)",
                type_="authentication_error",
                code="invalid_api_key",
            )

    async def _read(self, request: Request) -> tuple[dict[str, Any], bytes]:
        body, raw = await read_json_object(request, self.config.max_request_bytes, "the router's")
        if body.get("model") != self.config.served_model_name:
            raise OpenAIError(
                404,
                f"The model `{body.get('model')}` does not exist. This "
                f"endpoint serves `{self.config.served_model_name}`.",
                param="model",
                code="model_not_found",
            )
        return body, raw

    async def handle(self, request: Request, route: str) -> Response:
        """Limits, auth, parsing, routing; the concurrency slot is held until the response
        (streamed or not) is complete."""
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if self.slots.locked():
            self.metrics.request_done(route, 429)
            return OpenAIError(
                429,
                f"the router has {self.config.max_concurrent_requests} "
                "requests in flight; retry later",
                type_="rate_limit_error",
            ).response({"x-request-id": request_id})
        await self.slots.acquire()
        self.metrics.inflight.inc()
        code, handed_off = 500, False

        def release() -> None:
            self.slots.release()
            self.metrics.inflight.dec()
            self.metrics.request_done(route, code)

        try:
            self._authorize(request)
            body, raw = await self._read(request)
            response = await self._route(route, body, raw, request_id)
            code = response.status_code
            response.headers["x-request-id"] = request_id
            if isinstance(response, StreamingResponse):
                response.body_iterator = _until_done(response.body_iterator, release)
                handed_off = True
            return response
        except OpenAIError as exc:
            code = exc.status
            return exc.response({"x-request-id": request_id})
        finally:
            if not handed_off:
                release()

    async def _route(
        self, route: str, body: dict[str, Any], raw: bytes, request_id: str
    ) -> Response:
        if route == "/v1/embeddings":
            if self.config.mode == "pd":
                raise OpenAIError(
                    400,
                    "this deployment is disaggregated into prefill and decode and serves no "
                    "embeddings; deploy the embedding model with task: embed and one "
                    "unified role",
                )
            return await self._forward("unified", route, body, raw, request_id)
        if self.config.mode == "pd":
            decode_body = {
                **body,
                "kv_transfer_params": await self._prefill(route, body, request_id),
            }
            return await self._forward("decode", route, decode_body, None, request_id)
        # Unified: the client's bytes go upstream untouched (no re-serialisation).
        return await self._forward("unified", route, body, raw, request_id)

    async def _prefill(
        self,
        route: str,
        body: dict[str, Any],
        request_id: str,
    ) -> dict[str, Any]:
        """Send a one-token copy to a prefill instance; return its kv_transfer_params."""
        copy = {k: v for k, v in body.items() if k not in ("stream_options",)}
        copy.update(
            stream=False,
            max_tokens=1,
            kv_transfer_params=dict(PREFILL_KV_PARAMS),
        )
        if "max_completion_tokens" in copy:
            copy["max_completion_tokens"] = 1
        tried: set[str] = set()
        last_error = "no prefill instance is available"
        for attempt in range(self.config.prefill_retries + 1):
            backend = self.pool.pick("prefill", tried)
            if backend is None:
                break
            tried.add(backend.url)
            if attempt:
                self.metrics.retries.labels("prefill").inc()
            try:
                status, content = await self._send(backend, route, copy, request_id)
            except UPSTREAM_ERRORS as exc:
                last_error = f"prefill instance {backend.url} failed: {exc!r}"
                self.metrics.errors.labels("connect", "prefill").inc()
                self.pool.eject(backend, repr(exc))
                continue
            if status >= 500:
                last_error = f"prefill instance {backend.url} answered {status}"
                self.metrics.errors.labels("status", "prefill").inc()
                continue
            if status != 200:
                raise _upstream_error(status, content)
            try:
                params = json.loads(content).get("kv_transfer_params")
            except (ValueError, AttributeError):
                params = None
            if not params:
                raise OpenAIError(
                    502,
                    f"prefill instance {backend.url} returned no "
                    "kv_transfer_params (is it a PD prefill engine?)",
                    type_="upstream_error",
                )
            return params
        raise OpenAIError(
            503,
            f"prefill failed after {len(tried)} attempt(s): {last_error}",
            type_="upstream_error",
        )

    async def _send(
        self, backend: Backend, route: str, body: dict[str, Any], request_id: str
    ) -> tuple[int, bytes]:
        backend.outstanding += 1
        backend.served += 1
        start = time.perf_counter()
        try:
            async with self._session.post(
                f"{backend.url}{route}", json=body, headers={"x-request-id": request_id}
            ) as response:
                return response.status, await response.read()
        finally:
            backend.outstanding -= 1
            self.metrics.upstream.labels(backend.role, backend.url).observe(
                time.perf_counter() - start
            )

    async def _forward(
        self, role: str, route: str, body: dict[str, Any], raw: bytes | None, request_id: str
    ) -> Response:
        """Send to one instance of `role` (another on a connection failure); stream back."""
        tried: set[str] = set()
        last_error = f"no {role} instance is available"
        for attempt in range(2):
            backend = self.pool.pick(role, tried)
            if backend is None:
                break
            tried.add(backend.url)
            if attempt:
                self.metrics.retries.labels(role).inc()
            backend.outstanding += 1
            start = time.perf_counter()
            try:
                upstream = await self._session.post(
                    f"{backend.url}{route}",
                    data=raw if raw is not None else _dumps(body),
                    headers={"x-request-id": request_id, "content-type": "application/json"},
                )
            except UPSTREAM_ERRORS as exc:
                backend.outstanding -= 1
                self.metrics.errors.labels("connect", role).inc()
                self.pool.eject(backend, repr(exc))
                last_error = f"{role} instance {backend.url} failed: {exc!r}"
                continue
            self.metrics.upstream.labels(role, backend.url).observe(time.perf_counter() - start)
            backend.served += 1
            if upstream.status != 200 or not body.get("stream"):
                try:
                    content = await upstream.read()
                except UPSTREAM_ERRORS as exc:
                    self.metrics.errors.labels("read", role).inc()
                    self.pool.eject(backend, repr(exc))
                    raise OpenAIError(
                        502,
                        f"{role} instance {backend.url} failed mid-response: {exc!r}",
                        type_="upstream_error",
                    ) from exc
                finally:
                    backend.outstanding -= 1
                    upstream.release()
                return Response(
                    content,
                    status_code=upstream.status,
                    media_type=upstream.headers.get("content-type"),
                )
            return StreamingResponse(
                self._relay(upstream, backend, role), media_type="text/event-stream"
            )
        raise OpenAIError(503, last_error, type_="upstream_error")

    async def _relay(
        self,
        upstream: aiohttp.ClientResponse,
        backend: Backend,
        role: str,
    ) -> AsyncIterator[bytes]:
        """Pass an SSE stream through chunk by chunk; a client that leaves closes upstream,
        which aborts the request in the engine."""
        start, first = time.perf_counter(), True
        try:
            async for chunk in upstream.content.iter_any():
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - start)
                    first = False
                yield chunk
        except UPSTREAM_ERRORS as exc:
            self.metrics.errors.labels("stream", role).inc()
            self.pool.eject(backend, repr(exc))
            yield sse(
                OpenAIError(
                    502,
                    f"{role} instance {backend.url} failed mid-stream: "
                    f"{exc!r}; the response is incomplete",
                    type_="upstream_error",
                ).body()
            )
            yield SSE_DONE
        finally:
            backend.outstanding -= 1
            # Closing (not releasing) drops the connection, so the engine aborts the request
            # when the client went away early.
            upstream.close()

    # ------------------------------------------------------------------ app

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="ascend-serve router", docs_url=None, redoc_url=None)

        async def completions(request: Request) -> Response:
            return await self.handle(request, "/v1/completions")

        async def chat(request: Request) -> Response:
            return await self.handle(request, "/v1/chat/completions")

        # Plain Starlette routes for the hot path: no FastAPI parameter machinery per request.
        app.add_route("/v1/completions", completions, methods=["POST"])
        app.add_route("/v1/chat/completions", chat, methods=["POST"])

        async def embeddings(request: Request) -> Response:
            return await self.handle(request, "/v1/embeddings")

        app.add_route("/v1/embeddings", embeddings, methods=["POST"])

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            entry: dict[str, Any] = {
                "id": self.config.served_model_name,
                "object": "model",
                "owned_by": "ascend-serve",
            }
            if self.config.max_model_len:
                entry["max_model_len"] = self.config.max_model_len
            return {"object": "list", "data": [entry]}

        @app.get("/health")
        async def health() -> Response:
            missing = [r for r in self.roles if not any(b.available for b in self.pool.members(r))]
            if missing:
                return JSONResponse(
                    {
                        "status": "unavailable",
                        "message": f"no healthy {', '.join(missing)} instance",
                    },
                    status_code=503,
                )
            return JSONResponse({"status": "ok"})

        @app.get("/metrics")
        async def metrics() -> Response:
            for role in self.roles:
                self.metrics.healthy.labels(role).set(
                    sum(b.available for b in self.pool.members(role))
                )
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/instances")
        async def instances() -> dict[str, Any]:
            return {
                role: [
                    {
                        "url": b.url,
                        "healthy": b.available,
                        "outstanding": b.outstanding,
                        "kv_usage": b.kv_usage,
                        "served": b.served,
                        "last_error": b.last_error,
                    }
                    for b in self.pool.members(role)
                ]
                for role in self.roles
            }

        @app.post("/instances/add")
        async def add(request: Request) -> dict[str, str]:
            role, url = await self._membership_body(request)
            if self.health:
                await self.health.check(self.pool.add(role, url))
            else:
                self.pool.add(role, url)
            return {"status": "added", "role": role, "url": url}

        @app.post("/instances/remove")
        async def remove(request: Request) -> Response:
            role, url = await self._membership_body(request)
            if not self.pool.remove(role, url):
                raise OpenAIError(404, f"{url} is not a {role} instance of this router")
            return JSONResponse({"status": "removed", "role": role, "url": url})

        @app.exception_handler(OpenAIError)
        async def on_error(request: Request, exc: OpenAIError) -> Response:
            return exc.response()

        return app

    async def _membership_body(self, request: Request) -> tuple[str, str]:
        self._authorize(request)
        try:
            body = json.loads(await request.body())
            role, url = body["role"], body["url"]
        except (ValueError, KeyError, TypeError) as exc:
            raise OpenAIError(400, 'expected {"role": ..., "url": "http://host:port"}') from exc
        if role not in self.roles:
            raise OpenAIError(400, f"role must be one of {list(self.roles)}", param="role")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise OpenAIError(400, "url must be http(s)://host:port", param="url")
        return role, url


async def _until_done(body: Any, done: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        done()


UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _upstream_error(status: int, content: bytes) -> OpenAIError:
    try:
        error = json.loads(content)["error"]
        return OpenAIError(
            status,
            str(error.get("message")),
            type_=str(error.get("type") or "invalid_request_error"),
            param=error.get("param"),
            code=error.get("code"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = content[:500].decode(errors="replace")
        return OpenAIError(status, text or "upstream error", type_="upstream_error")
