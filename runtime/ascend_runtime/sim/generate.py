"""The sim engine's completions and chat endpoints, shaped as vLLM's OpenAI server shapes
them: batched prompts (one choice each), stop strings left out with `stop_reason`, echo,
deterministic logprobs, streaming with usage, and kv_transfer_params on PD prefill."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..openai import (
    SSE_DONE,
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    new_id,
    now,
    parse_body,
    sse,
)
from . import model, outputs
from .engine import Sequence

if TYPE_CHECKING:
    from .server import SimServer

MAX_BODY_BYTES = 32 * 1024 * 1024
CHAT_DEFAULT_MAX_TOKENS = 128
MAX_TOP_LOGPROBS = 20


@dataclass
class Output:
    """What one sequence produced so far, for one choice."""

    index: int
    seq: Sequence
    top: int | None
    """Logprobs asked for: None (none), else how many alternatives per token."""
    prefix: str = ""
    """Echoed prompt text (completions with echo)."""
    text: list[str] = field(default_factory=list)
    entries: list[tuple[str, int, float, list[tuple[str, float]]]] = field(default_factory=list)
    offset: int = 0

    def add(self, token: int, text: str, state: int) -> list[tuple[str, int, float, Any]]:
        """Record one token; its logprob entries (empty when not asked for)."""
        self.text.append(text)
        if self.top is None:
            return []
        lp, top = outputs.logprobs(state, token, self.top)
        word = " " + model.detokenize(token)
        entry = (word, self.offset, lp, top)
        self.offset += len(word)
        self.entries.append(entry)
        return [entry]


class GenerateApi:
    """/v1/completions and /v1/chat/completions of one sim instance."""

    def __init__(self, server: SimServer):
        self.server = server

    # ------------------------------------------------------------------ endpoints

    async def completions(self, request: Request) -> Response:
        req = await parse_body(request, CompletionRequest, MAX_BODY_BYTES)
        prompts = _prompts(req.prompt)
        top = self._top(req.logprobs, req.logprobs is not None, "logprobs")
        if len(prompts) > 1 and req.kv_transfer_params:
            raise OpenAIError(
                400,
                "kv_transfer_params belong to one prompt; send one request per prompt",
                param="kv_transfer_params",
            )
        outs = []
        for index, (text, tokens) in enumerate(prompts):
            seq = await self.server.sequence(req, tokens, self.server.settings.default_max_tokens)
            outs.append(Output(index, seq, top, prefix=text if req.echo else ""))
        base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                "model": req.model}  # fmt: skip

        def choice(out: Output, text: str, entries: list[Any], finish: str | None) -> dict:
            return {
                "index": out.index,
                "text": text,
                "logprobs": outputs.completion_logprobs(entries) if out.top is not None else None,
                "finish_reason": finish,
                "stop_reason": out.seq.text.stop_reason if finish else None,
            }

        if req.stream:
            return self._streaming(req, outs, base, choice, opening=None)
        await self._run(request, outs)
        choices = [
            choice(o, o.prefix + "".join(o.text), o.entries, o.seq.finish_reason) for o in outs
        ]
        return self._respond(outs, {**base, "choices": choices})

    async def chat(self, request: Request) -> Response:
        req = await parse_body(request, ChatRequest, MAX_BODY_BYTES)
        top = self._top(req.top_logprobs or 0, bool(req.logprobs), "top_logprobs")
        tokens = self.server.chat_tokens(req.messages)
        seq = await self.server.sequence(req, tokens, CHAT_DEFAULT_MAX_TOKENS)
        outs = [Output(0, seq, top)]
        base = {"id": new_id("chatcmpl"), "created": now(), "model": req.model}

        def choice(out: Output, text: str, entries: list[Any], finish: str | None) -> dict:
            return {
                "index": 0,
                "delta": {"content": text} if text or finish is None else {},
                "logprobs": outputs.chat_logprobs(entries) if out.top is not None else None,
                "finish_reason": finish,
                "stop_reason": out.seq.text.stop_reason if finish else None,
            }

        if req.stream:
            opening = {"index": 0, "delta": {"role": "assistant", "content": ""},
                       "logprobs": None, "finish_reason": None}  # fmt: skip
            chunk = {**base, "object": "chat.completion.chunk"}
            return self._streaming(req, outs, chunk, choice, opening)
        await self._run(request, outs)
        message = {"role": "assistant", "content": "".join(outs[0].text)}
        whole = choice(outs[0], "", outs[0].entries, seq.finish_reason)
        del whole["delta"]
        body = {**base, "object": "chat.completion", "choices": [{**whole, "message": message}]}
        return self._respond(outs, body)

    # ------------------------------------------------------------------ running

    @staticmethod
    def _top(count: int | None, asked: bool, param: str) -> int | None:
        if not asked:
            return None
        if count is None or not 0 <= count <= MAX_TOP_LOGPROBS:
            raise OpenAIError(
                400, f"{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {count}", param=param
            )
        return count

    async def _run(self, request: Request, outs: list[Output]) -> None:
        """Run every sequence to its end, aborting them all if the client disconnects."""

        async def one(out: Output) -> None:
            async for kind, event in self.server.events(out.seq):
                if kind == "token":
                    out.add(event.token, event.text, event.state)

        task = asyncio.gather(*(one(o) for o in outs))
        await self.server.await_or_abort(request, task)

    def _respond(self, outs: list[Output], body: dict[str, Any]) -> JSONResponse:
        body["usage"] = _usage([o.seq for o in outs])
        if len(outs) == 1:
            kv = self.server.kv_params(outs[0].seq)
            if kv is not None:
                body["kv_transfer_params"] = kv
        return JSONResponse(body)

    def _streaming(
        self, req: Any, outs: list[Output], base: dict[str, Any], choice: Any,
        opening: dict[str, Any] | None,
    ) -> StreamingResponse:  # fmt: skip
        return StreamingResponse(
            self._chunks(req, outs, base, choice, opening), media_type="text/event-stream"
        )

    async def _chunks(
        self, req: Any, outs: list[Output], base: dict[str, Any], choice: Any,
        opening: dict[str, Any] | None,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        if opening is not None:
            yield sse({**base, "choices": [opening]})
        for out in outs:
            if out.prefix:
                yield sse({**base, "choices": [choice(out, out.prefix, [], None)]})
        queue: asyncio.Queue[tuple[Output, str, Any] | None] = asyncio.Queue()

        async def feed(out: Output) -> None:
            try:
                async for kind, event in self.server.events(out.seq):
                    await queue.put((out, kind, event))
            except OpenAIError as exc:
                await queue.put((out, "error", exc))

        tasks = [asyncio.create_task(feed(o)) for o in outs]
        finished = 0
        try:
            while finished < len(outs):
                out, kind, event = await queue.get()  # type: ignore[misc]
                if kind == "token":
                    entries = out.add(event.token, event.text, event.state)
                    if event.text or entries:
                        yield sse({**base, "choices": [choice(out, event.text, entries, None)]})
                elif kind == "finish":
                    finished += 1
                    final: dict[str, Any] = {**base, "choices": [choice(out, "", [], event)]}
                    kv = self.server.kv_params(out.seq) if len(outs) == 1 else None
                    if kv is not None:
                        final["kv_transfer_params"] = kv
                    yield sse(final)
                else:
                    yield sse(event.body())
                    break
            if (req.stream_options or {}).get("include_usage"):
                yield sse({**base, "choices": [], "usage": _usage([o.seq for o in outs])})
            yield SSE_DONE
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _usage(seqs: list[Sequence]) -> dict[str, int]:
    prompt = sum(len(s.prompt) for s in seqs)
    completion = sum(len(s.output) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str, list[int]]]:
    """(text, tokens) of each prompt of a request: one string, one list of token ids, or a
    batch of either (vLLM answers a batch with one choice per prompt)."""
    if isinstance(prompt, str):
        return [(prompt, model.tokenize(prompt))]
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        ids = [int(p) for p in prompt]  # type: ignore[arg-type]
        return [(_text_of(ids), ids)]
    batch = []
    for one in prompt:
        if isinstance(one, str):
            batch.append((one, model.tokenize(one)))
        elif isinstance(one, list) and one and all(isinstance(t, int) for t in one):
            batch.append((_text_of(one), [int(t) for t in one]))
        else:
            raise OpenAIError(
                400, "each prompt of a batch must be a string or a list of token ids",
                param="prompt",
            )  # fmt: skip
    return batch


def _text_of(ids: list[int]) -> str:
    return " ".join(model.detokenize(t) for t in ids)
