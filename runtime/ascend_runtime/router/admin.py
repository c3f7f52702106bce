"""The router's admin endpoints: who is behind it (`GET /instances`), and changing that by
hand (`POST /instances/add`, `/instances/remove`).

Changing membership needs its own credential (`admin_keys_file`, from spec.router's
adminKeysSecret), never an API key: anyone who can add an instance can read every prompt sent
to it. Without that credential the two POST endpoints are off. Where membership comes from
EndpointSlices they stay off unless asked for, since the next EndpointSlice change would undo
a hand edit anyway."""

from __future__ import annotations

import hmac
import json
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..openai import OpenAIError, read_body
from .pool import Backend, Pool


def load_keys(path: str | None, what: str) -> set[str]:
    """Bearer keys listed one per line in `path` (none when path is None)."""
    if not path:
        return set()
    text = pathlib.Path(path).read_text(encoding="utf-8")
    keys = {line.strip() for line in text.splitlines() if line.strip()}
    if not keys:
        raise ValueError(f"{path} lists no {what}")
    return keys


def bearer_matches(request: Request, keys: set[str]) -> bool:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    # compare with every key, so the time taken says nothing about which one nearly matched
    return any([hmac.compare_digest(token, key) for key in keys])


def describe_instance(b: Backend) -> dict[str, Any]:
    return {
        "url": b.url,
        "healthy": b.available,
        "outstanding": b.outstanding,
        "kv_usage": b.kv_usage,
        "served": b.served,
        "consecutive_failures": b.consecutive_failures,
        "last_error": b.last_error,
    }


def add_admin_routes(
    app: FastAPI,
    pool: Pool,
    roles: tuple[str, ...],
    admin_keys: set[str],
    *,
    authorize: Callable[[Request], None],
    admit: Callable[[Backend], Awaitable[None]],
) -> None:
    """Mount the admin endpoints; `authorize` guards the read-only listing (API keys),
    `admit` health-checks an added instance."""

    def require_admin(request: Request) -> None:
        if not admin_keys:
            raise OpenAIError(
                403,
                "membership changes are off on this router: give it an admin credential "
                "(spec.router.adminKeysSecret, a Secret whose `admin-keys` entry lists keys) "
                "to turn them on",
                type_="permission_error",
            )
        if not bearer_matches(request, admin_keys):
            raise OpenAIError(
                401,
                "membership changes need an admin key (Authorization: Bearer <admin key>); "
                "API keys are not accepted here",
                type_="authentication_error",
            )

    async def membership_body(request: Request) -> tuple[str, str]:
        require_admin(request)
        raw = await read_body(request, 64 * 1024, "the admin endpoint's", timeout=10.0)
        try:
            body = json.loads(raw)
            role, url = body["role"], body["url"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise OpenAIError(400, 'expected {"role": ..., "url": "http://host:port"}') from exc
        if role not in roles:
            raise OpenAIError(400, f"role must be one of {list(roles)}", param="role")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise OpenAIError(400, "url must be http(s)://host:port", param="url")
        return role, url

    @app.get("/instances")
    async def instances(request: Request) -> dict[str, Any]:
        authorize(request)
        return {role: [describe_instance(b) for b in pool.members(role)] for role in roles}

    @app.post("/instances/add")
    async def add(request: Request) -> dict[str, str]:
        role, url = await membership_body(request)
        await admit(pool.add(role, url))
        return {"status": "added", "role": role, "url": url}

    @app.post("/instances/remove")
    async def remove(request: Request) -> Response:
        role, url = await membership_body(request)
        if not pool.remove(role, url):
            raise OpenAIError(404, f"{url} is not a {role} instance of this router")
        return JSONResponse({"status": "removed", "role": role, "url": url})
