"""The sim engine's HTTP server: the OpenAI API (plus /health, /metrics); PD instances also
run the KV-transfer side (`pd`: a TCP KV server on prefill, a puller on decode)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import RuntimeConfig
from ..kv.events import KvEventPublisher
from ..openai import (
    DetokenizeRequest,
    EmbeddingRequest,
    OpenAIError,
    TokenizeRequest,
    new_id,
    now,
    parse_body,
)
from ..roles import Role
from . import embeddings, model, pd
from .engine import Sequence, SimEngine
from .generate import MAX_BODY_BYTES, GenerateApi
from .metrics import EngineMetrics

log = logging.getLogger("ascend_runtime.sim")


class SimServer:
    """One sim engine instance: engine, metrics, PD exporter/puller, and its two apps."""

    def __init__(
        self,
        config: RuntimeConfig,
        instance: int,
        host_ip: str,
        kv_port: int | None = None,
        bind_host: str = "0.0.0.0",
    ):
        self.config = config
        self.settings = config.sim
        self.instance = instance
        if config.kv_transfer is not None:
            self.engine_id = f"{config.kv_transfer.engine_id_prefix}-{instance}"
        else:
            self.engine_id = f"{config.deployment}-{config.role}-{instance}"
        self.metrics = EngineMetrics(config.served_model_name, self.engine_id)
        self.metrics.describe_cache(
            self.settings.block_size, self.settings.num_blocks, bool(self.settings.prefix_caching)
        )
        self.engine = SimEngine(self.settings, self.metrics)
        self.exporter: pd.KvExporter | None = None
        self.importer: pd.KvImporter | None = None
        if config.role == Role.PREFILL:
            port = kv_port or (config.kv_transfer.kv_port if config.kv_transfer else 0)
            self.exporter = pd.KvExporter(
                self.engine, config, self.engine_id, host_ip, port, bind_host
            )
        elif config.role == Role.DECODE:
            self.importer = pd.KvImporter(self.engine, config)
        self.kv_events: KvEventPublisher | None = None
        self.api = self._api_app()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        events, cache = self.settings.kv_events, self.engine.cache
        if events is not None and cache is not None:
            self.kv_events = KvEventPublisher(
                events.endpoint, events.replay_endpoint, topic=events.topic
            )
            cache.listeners.append(self.kv_events.add)
            self.engine.after_step.append(self.kv_events.flush)
            self.kv_events.start()
            log.info("KV events on %s", self.kv_events.endpoint)
        self.engine.start()
        if self.exporter:
            await self.exporter.start()

    async def stop(self) -> None:
        await self.engine.stop()
        if self.kv_events:
            await self.kv_events.close()
        if self.exporter:
            await self.exporter.stop()
        if self.importer:
            await self.importer.close()

    # ------------------------------------------------------------------ requests

    def _sample_seed(self, req: Any, prompt: list[int]) -> int:
        if req.seed is not None:
            return int(req.seed)
        digest = hashlib.blake2b(
            repr((self.settings.seed, prompt[:64], len(prompt))).encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "little")

    def _check_model(self, req: Any, task: str) -> None:
        if req.model is None:
            req.model = self.config.served_model_name
        if req.model != self.config.served_model_name:
            raise OpenAIError(
                404,
                f"The model `{req.model}` does not exist. This server serves "
                f"`{self.config.served_model_name}`.",
                param="model",
            )
        if self.config.task != task:
            api = "the embeddings API" if task == "embed" else "completions and chat"
            raise OpenAIError(
                400,
                f"`{req.model}` is deployed with task: {self.config.task} and does not serve "
                f"{api}; deploy it with task: {task} for that",
                param="model",
            )

    def _check_common(self, req: Any) -> None:
        self._check_model(req, "generate")
        if req.n != 1:
            raise OpenAIError(400, "n must be 1 (the sim engine returns one choice)", param="n")

    async def sequence(self, req: Any, prompt: list[int], default_max: int) -> Sequence:
        self._check_common(req)
        limit = self.settings.max_model_len
        max_tokens = req.output_limit(default_max)
        if max_tokens <= 0:
            raise OpenAIError(
                400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens"
            )
        if len(prompt) >= limit:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {limit} tokens. "
                f"However, your prompt has {len(prompt)} tokens.",
                param="prompt",
            )
        if len(prompt) + max_tokens > limit:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {limit} tokens. "
                f"However, you requested {len(prompt) + max_tokens} tokens "
                f"({len(prompt)} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        seq = Sequence(
            request_id=new_id("req"),
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=req.temperature,
            sample_seed=self._sample_seed(req, prompt),
            seed=self.settings.seed,
            stop=stop,
        )
        params = req.kv_transfer_params or {}
        if self.config.role == Role.PREFILL and params.get("do_remote_decode"):
            seq.hold_blocks = True
            seq.max_tokens = 1
        elif self.importer is not None and params.get("do_remote_prefill"):
            await self.importer.pull(params, seq)
        elif self.config.role == Role.DECODE and params:
            raise OpenAIError(
                400,
                "a decode instance needs kv_transfer_params from a prefill "
                "instance (do_remote_prefill: true)",
                param="kv_transfer_params",
            )
        return seq

    async def events(self, seq: Sequence) -> AsyncIterator[tuple[str, Any]]:
        """Tokens and the end of one sequence; aborts it if the consumer goes away."""
        self.engine.add(seq)
        try:
            while True:
                event = await seq.events.get()
                if event.kind == "token":
                    yield "token", event
                elif event.kind == "finish":
                    yield "finish", event.reason
                    return
                else:
                    raise OpenAIError(500, f"engine error: {event.reason}", type_="server_error")
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    def kv_params(self, seq: Sequence) -> dict[str, Any] | None:
        if seq.hold_blocks and self.exporter is not None:
            return self.exporter.hold(seq)
        return None

    async def embeddings(self, request: Request) -> Response:
        """Each input is one prefill-only sequence through the same scheduler (batch, token
        and KV limits, and the prefill latency model) as generation."""
        req = await parse_body(request, EmbeddingRequest, MAX_BODY_BYTES)
        self._check_model(req, "embed")
        dims = embeddings.output_dimensions(req, self.settings.vector_dim)
        inputs = embeddings.input_tokens(req, self.settings.max_model_len)
        seqs = [
            Sequence(
                request_id=new_id("embd"),
                prompt=tokens,
                max_tokens=1,
                temperature=0.0,
                sample_seed=0,
                seed=self.settings.seed,
                pooling=True,
            )
            for tokens in inputs
        ]

        task = asyncio.gather(*(self._drain(seq) for seq in seqs))
        await self.await_or_abort(request, task)
        vectors = [
            embeddings.embed(t, self.settings.seed, self.settings.vector_dim, dims) for t in inputs
        ]
        return JSONResponse(
            embeddings.embeddings_response(req, vectors, sum(len(t) for t in inputs))
        )

    async def _drain(self, seq: Sequence) -> None:
        async for _ in self.events(seq):
            pass

    async def await_or_abort(self, request: Request, task: asyncio.Future[Any]) -> None:
        """Wait for `task`, cancelling it (which aborts its sequences) if the client leaves."""
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise OpenAIError(499, "client disconnected")
        task.result()

    def chat_tokens(self, messages: list[Any]) -> list[int]:
        """The sim's chat template: one `role: content` line per message."""
        text = "\n".join(model.chat_line(m.role, m.content) for m in messages)
        return model.tokenize(text)

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: a prompt or chat messages -> token ids and their count."""
        req = await parse_body(request, TokenizeRequest, MAX_BODY_BYTES)
        if req.model is not None and req.model != self.config.served_model_name:
            self._check_model(req, self.config.task)
        if req.messages is not None:
            tokens = self.chat_tokens(req.messages)
        elif req.prompt is not None:
            tokens = model.tokenize(req.prompt)
        else:
            raise OpenAIError(400, "give either prompt or messages", param="prompt")
        return JSONResponse(
            {"count": len(tokens), "max_model_len": self.settings.max_model_len, "tokens": tokens}
        )

    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: token ids -> text."""
        req = await parse_body(request, DetokenizeRequest, MAX_BODY_BYTES)
        return JSONResponse({"prompt": " ".join(model.detokenize(t) for t in req.tokens)})

    # ------------------------------------------------------------------ apps

    def _api_app(self) -> FastAPI:
        app = FastAPI(title="ascend-serve sim engine", docs_url=None, redoc_url=None)
        app.add_exception_handler(OpenAIError, _error_handler)  # type: ignore[arg-type]
        generate = GenerateApi(self)
        app.add_api_route("/v1/completions", generate.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", generate.chat, methods=["POST"])
        app.add_api_route("/v1/embeddings", self.embeddings, methods=["POST"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {
                "object": "list",
                "data": [
                    {
                        "id": self.config.served_model_name,
                        "object": "model",
                        "created": now(),
                        "owned_by": "ascend-serve",
                        "root": self.config.model_path,
                        "max_model_len": self.settings.max_model_len,
                    }
                ],
            }

        @app.get("/health")
        async def health() -> Response:
            task = self.engine._task
            if task is None or task.done():
                return JSONResponse({"status": "engine stopped"}, status_code=503)
            return Response(status_code=200)

        @app.get("/metrics")
        async def metrics() -> Response:
            self.metrics.refresh(
                len(self.engine.running), len(self.engine.waiting), self.engine.kv_usage
            )
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return app


async def _error_handler(request: Request, exc: OpenAIError) -> Response:
    return exc.response()
