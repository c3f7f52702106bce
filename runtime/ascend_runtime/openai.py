"""The OpenAI wire format shared by the sim engine and the router: request models, SSE
framing, and OpenAI-style errors."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect


class OpenAIError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status. As in vLLM's server,
    `code` is the HTTP status (an integer); `type` says what kind of error it is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    """None: the served model (as vLLM does)."""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    n: int = 1
    ignore_eos: bool = False
    kv_transfer_params: dict[str, Any] | None = None

    def output_limit(self, default: int) -> int:
        value = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )
        return default if value is None else value


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    """How many alternatives to return per token, with the chosen one's logprob."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: one input or a batch (strings, or token ids)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    dimensions: int | None = Field(default=None, gt=0)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def validation_error(exc: ValidationError) -> OpenAIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    return OpenAIError(400, f"{param}: {first['msg']}", param=param)


class ClientClosedError(Exception):
    """The client went away before its request was read or answered."""


async def read_body(
    request: Request, max_bytes: int, owner: str = "the", timeout: float | None = None
) -> bytes:
    """The request body, read chunk by chunk: a body over `max_bytes` is refused as soon as it
    passes the limit (never buffered whole), and one not complete within `timeout` seconds
    (a client sending slowly) is refused too. Raises OpenAIError (413, 408) or ClientClosedError."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise OpenAIError(
            413,
            f"request body of {length} bytes exceeds {owner} limit of {max_bytes} bytes",
        )

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise OpenAIError(413, f"request body exceeds {owner} limit of {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        async with asyncio.timeout(timeout):  # in this task: no task per request
            return await collect()
    except TimeoutError:
        raise OpenAIError(
            408,
            f"the request body did not arrive within {timeout:g} s; send it at once",
        ) from None
    except ClientDisconnect:
        raise ClientClosedError() from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A body as a JSON object; raises OpenAIError 400 for anything else."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise OpenAIError(400, "request body is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    return data


async def read_json_object(
    request: Request, max_bytes: int, owner: str = "the", timeout: float | None = None
) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object and as bytes (see read_body and parse_json_object)."""
    raw = await read_body(request, max_bytes, owner, timeout)
    return parse_json_object(raw), raw


async def parse_body(request: Request, model: type[BaseModel], max_bytes: int) -> Any:
    """Read and validate a JSON body, with a size limit; raises OpenAIError."""
    data, _ = await read_json_object(request, max_bytes)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
