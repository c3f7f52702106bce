"""Prefill/decode KV hand-off of the sim engine, following Mooncake's protocol as the router
sees it: the prefill engine keeps a finished request's blocks and answers with
kv_transfer_params; the decode engine pulls the blocks from `remote_host:remote_port`, checks
them, and tells the prefill engine to free them (which it also does on a timeout).

The pull is a plain HTTP fetch of the block bytes for now; the KV-transfer component replaces
the transport, not the protocol."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import httpx

from ..openai import OpenAIError
from . import model
from .engine import Sequence, SimEngine

REQUIRED_PARAMS = (
    "remote_engine_id",
    "remote_host",
    "remote_port",
    "remote_block_ids",
    "remote_request_id",
)


@dataclass
class Held:
    seq: Sequence
    expires_at: float


class KvExporter:
    """Prefill side: blocks of finished requests, held until pulled+freed or expired."""

    def __init__(self, engine: SimEngine, engine_id: str, host: str, port: int, timeout: float):
        self.engine, self.engine_id, self.host, self.port = engine, engine_id, host, port
        self.timeout = timeout
        self.held: dict[str, Held] = {}
        self.expired = 0
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="kv-reaper")

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    def hold(self, seq: Sequence) -> dict[str, Any]:
        """Keep `seq`'s blocks and return the kv_transfer_params for the decode side."""
        self.held[seq.request_id] = Held(seq, time.monotonic() + self.timeout)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "remote_request_id": seq.request_id,
            "remote_block_ids": list(seq.blocks),
            "remote_num_tokens": len(seq.prompt),
            "remote_pcp_size": 1,
            "remote_dcp_size": 1,
        }

    def export(self, request_id: str, engine_id: str, block_ids: list[int]) -> bytes:
        held = self._lookup(request_id, engine_id)
        if block_ids != held.seq.blocks:
            raise OpenAIError(
                400, f"block ids {block_ids} do not match the blocks held for request {request_id}"
            )
        prompt_states = held.seq.states[: len(held.seq.prompt)]
        return model.block_payload(prompt_states)

    def free(self, request_id: str, engine_id: str) -> None:
        held = self._lookup(request_id, engine_id)
        del self.held[request_id]
        self.engine.release_held(held.seq)

    def _lookup(self, request_id: str, engine_id: str) -> Held:
        if engine_id != self.engine_id:
            raise OpenAIError(
                404,
                f"this is prefill engine {self.engine_id}, not {engine_id}",
                code="kv_not_found",
            )
        held = self.held.get(request_id)
        if held is None:
            raise OpenAIError(
                404,
                f"prefill engine {self.engine_id} holds no KV blocks for "
                f"request {request_id} (expired after {self.timeout:g} s, "
                "already freed, or never produced)",
                code="kv_not_found",
            )
        return held

    def release_expired(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        gone = [rid for rid, h in self.held.items() if h.expires_at <= now]
        for rid in gone:
            self.engine.release_held(self.held.pop(rid).seq)
        self.expired += len(gone)
        return len(gone)

    def release_all(self) -> None:
        for held in self.held.values():
            self.engine.release_held(held.seq)
        self.held.clear()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))
            self.release_expired()


def checksum(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def check_params(params: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_PARAMS if params.get(k) in (None, "")]
    if missing:
        raise OpenAIError(
            400,
            f"kv_transfer_params lacks {', '.join(missing)}: pass the "
            "kv_transfer_params a prefill instance returned",
            param="kv_transfer_params",
        )
    if not isinstance(params["remote_block_ids"], list) or not all(
        isinstance(b, int) for b in params["remote_block_ids"]
    ):
        raise OpenAIError(
            400,
            "kv_transfer_params.remote_block_ids must be a list of integers",
            param="kv_transfer_params",
        )
    if not isinstance(params["remote_port"], int):
        raise OpenAIError(
            400, "kv_transfer_params.remote_port must be an integer", param="kv_transfer_params"
        )


async def pull(
    client: httpx.AsyncClient,
    params: dict[str, Any],
    prompt_len: int,
) -> list[int]:
    """Fetch and verify the prompt's KV from the prefill engine, then have it freed."""
    check_params(params)
    engine_id, host, port = params["remote_engine_id"], params["remote_host"], params["remote_port"]
    request_id = params["remote_request_id"]
    base = f"http://{host}:{port}/kv/{request_id}"
    where = f"prefill engine {engine_id} at {host}:{port}"
    query = {
        "engine_id": engine_id,
        "block_ids": ",".join(str(b) for b in params["remote_block_ids"]),
    }
    try:
        response = await client.get(base, params=query)
    except httpx.HTTPError as exc:
        raise OpenAIError(
            502, f"could not pull KV blocks from {where}: {exc!r}", type_="kv_transfer_error"
        ) from exc
    if response.status_code == 404:
        raise OpenAIError(
            400,
            f"kv_transfer_params are expired or unknown: {_remote_message(response)}",
            param="kv_transfer_params",
            code="kv_expired",
        )
    if response.status_code != 200:
        raise OpenAIError(
            502,
            f"{where} refused the KV pull ({response.status_code}): {_remote_message(response)}",
            type_="kv_transfer_error",
        )
    payload = response.content
    if response.headers.get("x-kv-checksum") != checksum(payload):
        raise OpenAIError(
            502, f"KV blocks from {where} failed their checksum", type_="kv_transfer_error"
        )
    states = model.payload_states(payload)
    if len(states) != prompt_len:
        raise OpenAIError(
            400,
            f"kv_transfer_params cover {len(states)} tokens but the prompt "
            f"has {prompt_len}: they belong to another request",
            param="kv_transfer_params",
        )
    with contextlib.suppress(httpx.HTTPError):
        await client.post(f"{base}/free", params={"engine_id": engine_id})
    return states


def _remote_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
