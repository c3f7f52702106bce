"""PD disaggregation: prefill on one instance, decode on another with the KV it holds; and
the checks that keep requests decode would refuse away from prefill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..openai import OpenAIError
from ..roles import Role
from . import checks
from .forward import Forwarder
from .kv_routing import Affinity
from .pool import Backend
from .upstream import UPSTREAM_ERRORS, UpstreamError, describe, dumps

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


class PdRouting:
    """Routes one request through a prefill and a decode instance."""

    def __init__(self, forwarder: Forwarder):
        self.forwarder = forwarder
        self.config, self.pool, self.metrics = forwarder.config, forwarder.pool, forwarder.metrics
        self.failures = forwarder.failures
        self.model_len = self.config.max_model_len

    async def route(
        self, route: str, body: dict[str, Any], request_id: str, stream: bool
    ) -> Response:
        """Prefill, then decode with the KV the prefill instance holds. Retried once, from the
        prefill on: when decode fails before its first byte (it may have pulled, and so
        released, the KV before it died) on another decode instance, and when decode cannot
        pull the KV (the prefill instance died after answering) on another prefill instance."""
        out = checks.output_limit(body)
        await self._check_context(route, body, out)
        batch = checks.prompt_batch(route, body)
        if batch is not None:
            return await self._batch(route, body, batch, request_id, stream)
        return await self._one(route, body, request_id, stream)

    async def _batch(
        self, route: str, body: dict[str, Any], prompts: list[Any], request_id: str, stream: bool
    ) -> Response:
        """A batch of prompts, as vLLM answers it (one choice per prompt, usage summed): each
        prompt goes through its own prefill and decode; the answers are merged."""
        if stream:
            raise OpenAIError(
                400,
                "streaming a batch of prompts is not supported with prefill/decode "
                "disaggregation; stream one prompt per request, or leave stream off",
                param="prompt",
            )
        answers = await asyncio.gather(
            *(
                self._one(route, {**body, "prompt": p}, f"{request_id}-{i}", False)
                for i, p in enumerate(prompts)
            )
        )
        failed = next((a for a in answers if a.status_code != 200), None)
        if failed is not None:
            return failed
        parts = [json.loads(bytes(a.body)) for a in answers]
        merged = dict(parts[0])
        merged["choices"] = [
            {**choice, "index": i} for i, part in enumerate(parts) for choice in part["choices"]
        ]
        usage = [p.get("usage") or {} for p in parts]
        merged["usage"] = {k: sum(u.get(k, 0) for u in usage) for k in usage[0]}
        return JSONResponse(merged)

    async def _one(
        self, route: str, body: dict[str, Any], request_id: str, stream: bool
    ) -> Response:
        avoid: set[str] = set()
        decoders: set[str] = set()
        kv = self.forwarder.kv
        affinity = await kv.affinity(Role.PREFILL, route, body) if kv else None
        # A decode instance caching the prompt's prefix pulls only the rest of its KV.
        decode_affinity = affinity.for_role(Role.DECODE) if affinity else None
        for attempt in range(2):
            params, prefill = await self._prefill(route, body, request_id, avoid, affinity)
            payload = dumps({**body, "kv_transfer_params": params})
            try:
                response = await self.forwarder.forward(
                    Role.DECODE, route, payload, stream, request_id, attempts=1,
                    tried=decoders, affinity=decode_affinity,
                )  # fmt: skip
            except OpenAIError as exc:
                if attempt or exc.status != 503:
                    raise
                log.warning(
                    "request %s: decode failed before its first byte (%s); prefilling again",
                    request_id,
                    exc.message,
                )
                self.metrics.retries.labels(Role.DECODE).inc()
                continue
            if attempt == 0 and _kv_pull_failed(response):
                log.warning(
                    "request %s: decode could not pull the KV from %s; prefilling again "
                    "on another instance",
                    request_id,
                    prefill.url,
                )
                self.metrics.retries.labels(Role.PREFILL).inc()
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
            backend = self.pool.pick(Role.DECODE)
            if backend is not None:
                data = await self._get_json(backend, "/v1/models")
                with contextlib.suppress(TypeError, KeyError, IndexError, ValueError):
                    self.model_len = int(data["data"][0]["max_model_len"])
        return self.model_len

    async def _count_tokens(self, route: str, body: dict[str, Any]) -> int | None:
        """The prompt's length as a decode instance tokenizes it (None: it cannot say)."""
        request = checks.tokenize_body(route, body)
        backend = self.pool.pick(Role.DECODE)
        if request is None or backend is None:
            return None
        data = await self._get_json(backend, "/tokenize", {**request, "model": body.get("model")})
        count = data.get("count") if isinstance(data, dict) else None
        return count if isinstance(count, int) else None

    async def _get_json(
        self, backend: Backend, path: str, body: dict[str, Any] | None = None
    ) -> Any:
        session = self.forwarder.upstream.session(False)
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
        self, route: str, body: dict[str, Any], request_id: str, avoid: set[str],
        affinity: Affinity | None = None,
    ) -> tuple[dict[str, Any], Backend]:  # fmt: skip
        """Send a one-token copy to a prefill instance (kv-aware: the one `affinity` picks);
        its kv_transfer_params and where."""
        copy = {k: v for k, v in body.items() if k not in ("stream_options",)}
        copy.update(stream=False, max_tokens=1, kv_transfer_params=dict(PREFILL_KV_PARAMS))
        if "max_completion_tokens" in copy:
            copy["max_completion_tokens"] = 1
        payload = dumps(copy)
        tried = set(avoid)
        last_error = "no prefill instance is available"
        for attempt in range(self.config.prefill_retries + 1):
            backend = self.pool.pick(Role.PREFILL, tried, affinity) or self.pool.pick(
                Role.PREFILL, frozenset(), affinity
            )
            if backend is None:
                break
            if attempt:
                self.metrics.retries.labels(Role.PREFILL).inc()
            tried.add(backend.url)
            try:
                status, _, content = await self.forwarder.exchange(
                    backend, route, payload, request_id, fresh=attempt > 0,
                    timeout=self.config.first_token_timeout_seconds,
                )  # fmt: skip
            except UpstreamError as exc:
                last_error = str(exc)
                self.metrics.errors.labels(exc.kind, Role.PREFILL).inc()
                self.failures.failed(backend, last_error, definitive=exc.definitive)
                continue
            finally:  # the prefill's answer ends its request on that instance
                if affinity is not None:
                    affinity.finish()
            if status >= 500:
                last_error = f"prefill instance {backend.url} answered {status}"
                self.metrics.errors.labels("status", Role.PREFILL).inc()
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
