"""The router: OpenAI front door that balances unified instances, or routes each request to a
prefill instance and then a decode instance (PD disaggregation, Mooncake's proxy flow)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..config import RouterConfig
from ..openai import SSE_DONE, ClientClosedError, OpenAIError, parse_json_object, read_body, sse
from . import checks
from .admin import add_admin_routes, bearer_matches, load_keys
from .health import HealthChecker
from .membership import Membership
from .metrics import CLIENT_CLOSED, RouterMetrics
from .policy import Backend, FailurePolicy
from .pool import Pool
from .upstream import (
    UPSTREAM_ERRORS,
    StreamWatch,
    Upstream,
    UpstreamError,
    WatchedStream,
    before_first_byte,
    describe,
    dumps,
)

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

TOKENIZER_ROUTES = ("/tokenize", "/detokenize")


class Router:
    """Request handling; the FastAPI app is `Router.app`."""

    def __init__(
        self, config: RouterConfig, pool: Pool | None = None, health_interval: float = 2.0
    ):
        self.config = config
        self.failures = FailurePolicy(health_timeout_seconds=config.health_timeout_seconds)
        self.pool = pool or Pool(policy=config.policy, failures=self.failures)
        self.pool.failures = self.failures
        self.metrics = RouterMetrics()
        # aiohttp, not httpx, for the hot path: measured on a 2-core machine, httpx's pool
        # served 164 req/s at 64 concurrent requests where aiohttp served 3270.
        self.upstream = Upstream()
        self.watch = StreamWatch(config.inter_token_timeout_seconds)
        self.health_interval = health_interval
        self.health: HealthChecker | None = None
        self.membership = Membership(config.backends, self.pool)
        self.inflight, self.capacity = 0, config.max_concurrent_requests
        self.api_keys = load_keys(config.api_keys_file, "API keys")
        self.admin_keys = load_keys(config.admin_keys_file, "admin keys")
        self.model_len = config.max_model_len
        self.app = self._build_app()

    async def start(self) -> None:
        await self.upstream.start()
        self.health = HealthChecker(self.pool, self.upstream.session(False), self.health_interval)
        await self.membership.start()
        await self.health.check_all()
        self.health.start()
        self.watch.start()

    async def stop(self) -> None:
        if self.health:
            await self.health.stop()
        await self.watch.stop()
        await self.membership.stop()
        await self.upstream.close()

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.config.mode == "pd" else ("unified",)

    # ------------------------------------------------------------------ request handling

    def _authorize(self, request: Request) -> None:
        if self.api_keys and not bearer_matches(request, self.api_keys):
            raise OpenAIError(
                401,
                "invalid or missing API key (Authorization: Bearer <key>)",
                type_="authentication_error",
            )

    def _check_model(self, body: dict[str, Any]) -> None:
        # vLLM serves its model to a request that names none
        model = body.get("model")
        if model is not None and model != self.config.served_model_name:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist. This "
                f"endpoint serves `{self.config.served_model_name}`.",
                type_="NotFoundError",
                param="model",
            )

    async def handle(self, request: Request, route: str) -> Response:
        """Auth and the body first (under a read timeout and the size limit), then a
        concurrency slot, held until the response (streamed or not) is complete: a client
        sending its body slowly holds no slot."""
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        headers = {"x-request-id": request_id}
        try:
            self._authorize(request)
            raw = await read_body(
                request,
                self.config.max_request_bytes,
                "the router's",
                self.config.body_timeout_seconds,
            )
        except OpenAIError as exc:
            self.metrics.request_done(route, exc.status)
            return exc.response(headers)
        except ClientClosedError:
            self._client_closed(route, request_id, "while sending the request body")
            return Response(status_code=CLIENT_CLOSED)
        if self.inflight >= self.capacity:
            self.metrics.request_done(route, 429)
            return OpenAIError(
                429,
                f"the router has {self.capacity} requests in flight; retry later",
                type_="rate_limit_error",
            ).response(headers)
        self.inflight += 1
        self.metrics.inflight.inc()
        code, handed_off = 500, False

        def release(completed: bool = True) -> None:
            self.inflight -= 1
            self.metrics.inflight.dec()
            if completed:
                self.metrics.request_done(route, code)
            else:
                self._client_closed(route, request_id, "during the response")

        try:
            body = parse_json_object(raw)
            self._check_model(body)
            response = await self._route(route, body, raw, request_id)
            code = response.status_code
            response.headers["x-request-id"] = request_id
            if isinstance(response, StreamingResponse):
                response.body_iterator = _until_done(response.body_iterator, release)
                handed_off = True
            return response
        except OpenAIError as exc:
            code = exc.status
            return exc.response(headers)
        except Exception:
            log.exception("request %s to %s failed", request_id, route)
            return OpenAIError(
                500, "the router failed on this request; see its log", type_="InternalServerError"
            ).response(headers)
        finally:
            if not handed_off:
                release()

    def _client_closed(self, route: str, request_id: str, when: str) -> None:
        self.metrics.request_done(route, CLIENT_CLOSED)
        log.info("request %s to %s: the client closed the connection %s", request_id, route, when)

    async def _route(
        self, route: str, body: dict[str, Any], raw: bytes, request_id: str
    ) -> Response:
        stream = bool(body.get("stream"))
        if route in TOKENIZER_ROUTES:  # any instance that answers the API has the tokenizer
            return await self._forward(self.roles[-1], route, raw, False, request_id)
        if route == "/v1/embeddings":
            if self.config.mode == "pd":
                raise OpenAIError(
                    400,
                    "this deployment is disaggregated into prefill and decode and serves no "
                    "embeddings; deploy the embedding model with task: embed and one "
                    "unified role",
                )
            return await self._forward("unified", route, raw, False, request_id)
        if self.config.mode == "pd":
            return await self._pd(route, body, request_id, stream)
        # Unified: the client's bytes go upstream untouched (no re-serialisation).
        return await self._forward("unified", route, raw, stream, request_id)

    # ------------------------------------------------------------------ PD

    async def _pd(
        self, route: str, body: dict[str, Any], request_id: str, stream: bool
    ) -> Response:
        """Prefill, then decode with the KV the prefill instance holds. When decode cannot
        pull that KV (the prefill instance died or restarted after answering), the prompt is
        prefilled again on another prefill instance, once."""
        out = checks.output_limit(body)
        await self._check_context(route, body, out)
        avoid: set[str] = set()
        for attempt in range(2):
            params, prefill = await self._prefill(route, body, request_id, avoid)
            payload = dumps({**body, "kv_transfer_params": params})
            response = await self._forward("decode", route, payload, stream, request_id)
            if attempt == 0 and _kv_pull_failed(response):
                log.warning(
                    "request %s: decode could not pull the KV from %s; prefilling again "
                    "on another instance",
                    request_id,
                    prefill.url,
                )
                self.metrics.retries.labels("prefill").inc()
                self.failures.failed(prefill, "its KV could not be pulled")
                avoid.add(prefill.url)
                continue
            return response
        raise AssertionError("unreachable")

    async def _check_context(self, route: str, body: dict[str, Any], out: int | None) -> None:
        limit = await self._max_model_len()
        if limit is None:
            return
        if out is not None and out >= limit:
            checks.check_fits(limit, 1, out)
        bound = checks.prompt_token_bound(route, body)
        if not checks.needs_count(limit, bound, out):
            return
        count = checks.prompt_ids_len(body)
        if count is None:
            count = await self._count_tokens(route, body)
        if count is not None:
            checks.check_fits(limit, count, out)

    async def _max_model_len(self) -> int | None:
        """From the plan, else from a decode instance's /v1/models (vLLM reports it)."""
        if self.model_len is None:
            backend = self.pool.pick("decode")
            if backend is not None:
                data = await self._get_json(backend, "/v1/models")
                with contextlib.suppress(TypeError, KeyError, IndexError, ValueError):
                    self.model_len = int(data["data"][0]["max_model_len"])
        return self.model_len

    async def _count_tokens(self, route: str, body: dict[str, Any]) -> int | None:
        """The prompt's length as a decode instance tokenizes it (None: it cannot say)."""
        request = checks.tokenize_body(route, body)
        backend = self.pool.pick("decode")
        if request is None or backend is None:
            return None
        data = await self._get_json(backend, "/tokenize", {**request, "model": body.get("model")})
        count = data.get("count") if isinstance(data, dict) else None
        return count if isinstance(count, int) else None

    async def _get_json(
        self, backend: Backend, path: str, body: dict[str, Any] | None = None
    ) -> Any:
        session = self.upstream.session(False)
        timeout = aiohttp.ClientTimeout(total=self.failures.health_timeout_seconds)
        try:
            if body is None:
                request = session.get(f"{backend.url}{path}", timeout=timeout)
            else:
                request = session.post(f"{backend.url}{path}", json=body, timeout=timeout)
            async with request as response:
                return await response.json() if response.status == 200 else None
        except (*UPSTREAM_ERRORS, ValueError) as exc:
            log.info("%s%s did not answer: %s", backend.url, path, describe(exc))
            return None

    async def _prefill(
        self, route: str, body: dict[str, Any], request_id: str, avoid: set[str]
    ) -> tuple[dict[str, Any], Backend]:
        """Send a one-token copy to a prefill instance; its kv_transfer_params and where."""
        copy = {k: v for k, v in body.items() if k not in ("stream_options",)}
        copy.update(stream=False, max_tokens=1, kv_transfer_params=dict(PREFILL_KV_PARAMS))
        if "max_completion_tokens" in copy:
            copy["max_completion_tokens"] = 1
        payload = dumps(copy)
        tried = set(avoid)
        last_error = "no prefill instance is available"
        for attempt in range(self.config.prefill_retries + 1):
            backend = self.pool.pick("prefill", tried) or self.pool.pick("prefill")
            if backend is None:
                break
            if attempt:
                self.metrics.retries.labels("prefill").inc()
            tried.add(backend.url)
            try:
                status, _, content = await self._exchange(
                    backend, route, payload, request_id, fresh=attempt > 0,
                    timeout=self.config.first_token_timeout_seconds,
                )  # fmt: skip
            except UpstreamError as exc:
                last_error = str(exc)
                self.metrics.errors.labels(exc.kind, "prefill").inc()
                self.failures.failed(backend, last_error, definitive=exc.definitive)
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
            return params, backend
        raise OpenAIError(
            503,
            f"prefill failed after {len(tried)} attempt(s): {last_error}",
            type_="upstream_error",
        )

    # ------------------------------------------------------------------ one instance

    async def _forward(
        self, role: str, route: str, payload: bytes | str, stream: bool, request_id: str
    ) -> Response:
        """Send to one instance of `role`; a failure before the first byte reaches the client
        is retried (another instance when there is one, on a fresh connection)."""
        tried: set[str] = set()
        last_error = f"no {role} instance is available"
        for attempt in range(1 + self.failures.retries_before_first_byte):
            backend = self.pool.pick(role, tried) or (self.pool.pick(role) if tried else None)
            if backend is None:
                break
            if not backend.available:
                self.metrics.fallbacks.labels(role).inc()
            if attempt:
                self.metrics.retries.labels(role).inc()
            tried.add(backend.url)
            try:
                if stream:
                    return await self._open_stream(backend, route, payload, request_id, attempt > 0)
                status, media, content = await self._exchange(
                    backend, route, payload, request_id, fresh=attempt > 0,
                    timeout=self.config.request_timeout_seconds,
                )  # fmt: skip
                return Response(content, status_code=status, media_type=media)
            except UpstreamError as exc:
                last_error = str(exc)
                self.metrics.errors.labels(exc.kind, role).inc()
                self.failures.failed(backend, last_error, definitive=exc.definitive)
        raise OpenAIError(503, f"{role}: {last_error}", type_="upstream_error")

    async def _exchange(
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
        self, backend: Backend, route: str, payload: bytes | str, request_id: str, fresh: bool
    ) -> Response:
        """Wait for the engine's first chunk (retryable until then), then relay the rest."""
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
            return StreamingResponse(
                self._relay(upstream, backend, first), media_type="text/event-stream"
            )
        finally:
            if not handed_off:
                backend.outstanding -= 1
                if upstream is not None:
                    upstream.close()

    async def _relay(
        self, upstream: aiohttp.ClientResponse, backend: Backend, first: bytes
    ) -> AsyncIterator[bytes]:
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
            if complete:
                upstream.release()
            else:
                upstream.close()

    # ------------------------------------------------------------------ app

    async def _admit(self, backend: Backend) -> None:
        if self.health:
            await self.health.check(backend)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="ascend-serve router", docs_url=None, redoc_url=None)

        def route_to(path: str) -> Callable[[Request], Any]:
            async def endpoint(request: Request) -> Response:
                return await self.handle(request, path)

            return endpoint

        # Plain Starlette routes for the hot path: no FastAPI parameter machinery per request.
        for path in (
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/embeddings",
            *TOKENIZER_ROUTES,
        ):
            app.add_route(path, route_to(path), methods=["POST"])

        def model_card() -> dict[str, Any]:
            entry: dict[str, Any] = {
                "id": self.config.served_model_name,
                "object": "model",
                "owned_by": "ascend-serve",
            }
            if self.model_len:
                entry["max_model_len"] = self.model_len
            return entry

        @app.get("/v1/models")
        async def models(request: Request) -> dict[str, Any]:
            self._authorize(request)
            return {"object": "list", "data": [model_card()]}

        @app.get("/v1/models/{model:path}")
        async def model(request: Request, model: str) -> Any:
            self._authorize(request)
            if model != self.config.served_model_name:
                raise OpenAIError(
                    404, f"The model `{model}` does not exist.", type_="NotFoundError"
                )
            return model_card()

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

        add_admin_routes(
            app,
            self.pool,
            self.roles,
            self.admin_keys,
            authorize=self._authorize,
            admit=self._admit,
        )

        @app.exception_handler(OpenAIError)
        async def on_error(request: Request, exc: OpenAIError) -> Response:
            return exc.response()

        @app.exception_handler(HTTPException)
        async def on_http_error(request: Request, exc: HTTPException) -> Response:
            # unknown paths and methods answer in OpenAI's error shape too
            message = f"{request.method} {request.url.path}: {exc.detail}"
            return OpenAIError(
                exc.status_code,
                message,
                type_="NotFoundError" if exc.status_code == 404 else "invalid_request_error",
            ).response()

        return app


async def _until_done(body: Any, done: Callable[[bool], None]) -> AsyncIterator[bytes]:
    complete = False
    try:
        async for chunk in body:
            yield chunk
        complete = True
    finally:
        done(complete)


def _kv_pull_failed(response: Response) -> bool:
    """Decode answered that it could not pull the prompt's KV (a transfer failure, not a
    problem with the request)."""
    if response.status_code != 502 or isinstance(response, StreamingResponse):
        return False
    return b"kv_transfer_error" in bytes(response.body)


def _upstream_error(status: int, content: bytes) -> OpenAIError:
    try:
        error = json.loads(content)["error"]
        return OpenAIError(
            status,
            str(error.get("message")),
            type_=str(error.get("type") or "invalid_request_error"),
            param=error.get("param"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = content[:500].decode(errors="replace")
        return OpenAIError(status, text or "upstream error", type_="upstream_error")
