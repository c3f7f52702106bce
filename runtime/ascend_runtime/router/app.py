"""The router: OpenAI front door that balances unified instances, or routes each request to a
prefill instance and then a decode instance (PD disaggregation, Mooncake's proxy flow)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from ..config import RouterConfig
from ..openai import ClientClosedError, OpenAIError, parse_json_object, read_body
from ..roles import PD_ROLES, Role
from .admin import add_admin_routes, bearer_matches, load_keys
from .forward import Forwarder
from .health import HealthChecker
from .kv_routing import KvRouting
from .membership import Membership
from .metrics import CLIENT_CLOSED, RouterMetrics
from .pd import PdRouting
from .policy import Backend, FailurePolicy
from .pool import Pool

log = logging.getLogger("ascend_runtime.router")

TOKENIZER_ROUTES = ("/tokenize", "/detokenize")
REQUEST_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", *TOKENIZER_ROUTES)
"""The routes requests are forwarded on (POST)."""


class Router:
    """Request handling. `Router.app` is the ASGI app to serve: the request routes go straight
    to `handle`, everything else to the FastAPI app `Router.api`."""

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
        self.forwarder = Forwarder(config, self.pool, self.metrics)
        self.kv: KvRouting | None = None
        if config.kv_aware is not None:
            self.kv = self.forwarder.kv = KvRouting(config.kv_aware, config.backends, self.metrics)
            self.kv.tokenize = self._engine_tokens
            self.pool.listeners.append(self.kv)
        self.pd = PdRouting(self.forwarder)
        self.health_interval = health_interval
        self.health: HealthChecker | None = None
        self.membership = Membership(config.backends, self.pool)
        self.inflight, self.capacity = 0, config.max_concurrent_requests
        self.api_keys = load_keys(config.api_keys_file, "API keys")
        self.admin_keys = load_keys(config.admin_keys_file, "admin keys")
        self.api = self._build_app()
        self._request_routes = frozenset(REQUEST_ROUTES)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point. Requests skip FastAPI's middleware stack (measured: about a
        third of the router's CPU per request); they need none of it, since `handle` answers
        every failure itself."""
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in self._request_routes
        ):
            response = await self.handle(Request(scope, receive), scope["path"])
            await response(scope, receive, send)
        else:
            await self.api(scope, receive, send)

    async def start(self) -> None:
        await self.forwarder.start()
        session = self.forwarder.upstream.session(False)
        self.health = HealthChecker(self.pool, session, self.health_interval)
        await self.membership.start()
        if self.kv:
            members = [(r, b.url) for r in list(self.pool.backends) for b in self.pool.members(r)]
            await self.kv.start(members)
        await self.health.check_all()
        self.health.start()

    async def stop(self) -> None:
        if self.health:
            await self.health.stop()
        await self.membership.stop()
        if self.kv:
            await self.kv.stop()
        await self.forwarder.stop()

    @property
    def roles(self) -> tuple[str, ...]:
        return PD_ROLES if self.config.mode == "pd" else (Role.UNIFIED,)

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
            return await self.forwarder.forward(self.roles[-1], route, raw, False, request_id)
        if route == "/v1/embeddings":
            if self.config.mode == "pd":
                raise OpenAIError(
                    400,
                    "this deployment is disaggregated into prefill and decode and serves no "
                    "embeddings; deploy the embedding model with task: embed and one "
                    "unified role",
                )
            return await self.forwarder.forward(Role.UNIFIED, route, raw, False, request_id)
        if self.config.mode == "pd":
            return await self.pd.route(route, body, request_id, stream)
        # Unified: the client's bytes go upstream untouched (no re-serialisation).
        affinity = await self.kv.affinity(Role.UNIFIED, route, body) if self.kv else None
        return await self.forwarder.forward(
            Role.UNIFIED, route, raw, stream, request_id, affinity=affinity
        )

    async def _engine_tokens(self, role: str, query: dict[str, Any]) -> list[int] | None:
        """A prompt's tokens from an engine of `role` (vLLM's /tokenize), for kv-aware
        hashing; None when none answers within a second."""
        backend = self.pool.pick(role)
        if backend is None:
            return None
        timeout = aiohttp.ClientTimeout(total=1.0)
        try:
            session = self.forwarder.upstream.session(False)
            async with session.post(f"{backend.url}/tokenize", json=query, timeout=timeout) as r:
                if r.status != 200:
                    return None
                tokens = (await r.json()).get("tokens")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            return None
        return tokens

    # ------------------------------------------------------------------ PD

    async def _admit(self, backend: Backend) -> None:
        if self.health:
            await self.health.check(backend)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="ascend-serve router", docs_url=None, redoc_url=None)

        def route_to(path: str) -> Callable[[Request], Any]:
            async def endpoint(request: Request) -> Response:
                return await self.handle(request, path)

            return endpoint

        # `app` answers POSTs on these itself; registered here too, so that other methods get
        # 405 and a trailing slash its redirect, as before.
        for path in REQUEST_ROUTES:
            app.add_route(path, route_to(path), methods=["POST"])

        def model_card() -> dict[str, Any]:
            entry: dict[str, Any] = {
                "id": self.config.served_model_name,
                "object": "model",
                "owned_by": "ascend-serve",
            }
            if self.pd.model_len:
                entry["max_model_len"] = self.pd.model_len
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
            if self.kv:
                self.kv.observe()
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
