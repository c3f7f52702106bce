"""Router policy kv-aware: each request's prompt hashed into blocks, its instance chosen by
where those blocks are cached (prefix_index.KvAwarePolicy; in PD the prefill instance, then
the decode instance), and in precise mode the engines' KV events followed, one subscriber per
instance, started and stopped with the membership. Over vLLM engines the prompt is tokenized
by the model's tokenizer in the router when it has one (router/hf_prompts.py; a sample is
checked against an engine's /tokenize), else by an engine's /tokenize."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..config import KvAwareRouting, RouterBackends
from ..kv.cache_events import KvEvent
from ..kv.events import KvEventSubscriber
from ..kv.vllm_hash import VllmBlockHasher
from .hf_prompts import HfPrompts, VllmChain
from .metrics import RouterMetrics
from .policy import Backend
from .prefix_index import KvAwarePolicy
from .prompt_hashes import Piece, PromptHasher, prompt_pieces, tokenize_request

Tokenize = Callable[[str, dict[str, Any]], Awaitable[list[int] | None]]
"""(role, /tokenize body) -> the token ids an engine of the role gives, None when it could
not answer."""

log = logging.getLogger("ascend_runtime.router")

THREAD_CHARS = 8192
"""New prompt text (not remembered from earlier prompts) past which the router's tokenizer
runs in a thread, so that a long fresh prompt does not hold up the event loop."""
CHECK_FIRST, CHECK_EVERY = 8, 256
"""The router's tokens are checked against an engine's /tokenize for the first prompts it
tokenizes, then for one in CHECK_EVERY."""


@dataclass
class Affinity:
    """One request's prompt blocks, and the instance they were placed on (until settled)."""

    routing: KvRouting
    role: str
    hashes: list[int]
    key: int
    placed: bool = False

    def choose(self, candidates: list[Backend]) -> Backend:
        """The candidate kv-aware prefers; a request retried elsewhere is placed anew."""
        self.settle()
        return self.routing.place(self, candidates)

    def for_role(self, role: str) -> Affinity:
        """The same prompt placed among another role's instances (PD: the decode instance
        after the prefill)."""
        return Affinity(self.routing, role, self.hashes, next(self.routing._keys))

    def settle(self) -> None:
        """The request's prefill is over (first token back, the answer, or a failure)."""
        if self.placed:
            self.placed = False
            self.routing.policy.prefilled(self.key)

    def finish(self) -> None:
        """The request is over on its instance (the whole answer, or a failure)."""
        self.settle()
        self.routing.policy.finished(self.key)


@dataclass
class KvRouting:
    """The kv-aware policy of one router (its index, subscribers and metrics)."""

    settings: KvAwareRouting
    backends: RouterBackends
    metrics: RouterMetrics
    policy: KvAwarePolicy = field(init=False)
    hasher: PromptHasher = field(init=False)
    subscribers: dict[str, list[KvEventSubscriber]] = field(default_factory=dict)
    """Instance -> one subscriber per data-parallel rank that publishes."""
    tokenize: Tokenize | None = None
    """How prompts are tokenized for hashing vllm (the router sets an engine call)."""
    prompts: HfPrompts | None = None
    """The model's tokenizer in the router (vLLM engines), once loaded and while trusted."""
    checks: tuple[int, int] = (CHECK_FIRST, CHECK_EVERY)
    """How many of the first prompts the router tokenizes are checked, and one in how many
    after them."""
    _vllm: VllmBlockHasher | None = field(init=False, default=None)
    _prompt_hasher: PromptHasher | None = field(init=False, default=None)
    _keys: itertools.count[int] = field(default_factory=itertools.count)
    _started: bool = False
    _tokenized: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _readings: dict[str, int] = field(default_factory=dict)
    """Instance -> the metrics scrape its KV usage last came from."""

    def __post_init__(self) -> None:
        s = self.settings
        self.policy = KvAwarePolicy(
            mode=s.mode, capacity=s.index_capacity, decode_weight=s.load_weight
        )
        self.hasher = PromptHasher(s.block_size)
        if s.hashing == "vllm":
            self._vllm = VllmBlockHasher(s.vllm_hash_algo, s.vllm_hash_seed)

    async def affinity(self, role: str, route: str, body: dict[str, Any]) -> Affinity | None:
        """The request's prompt blocks, None where there is no single prompt to place, or
        its tokens could not be had (the pool then balances by load)."""
        if self._vllm is None:
            return self.local_affinity(role, route, body)
        started = time.perf_counter()
        salt = body.get("cache_salt")
        if not self._vllm_keys_known(body) or (
            salt is not None and not (isinstance(salt, str) and salt)
        ):
            return None
        tokens, query = tokenize_request(route, body)
        hashes = None
        if tokens is None and query is not None and self.prompts is not None:
            hashes = await self._router_hashes(role, route, body, salt)
        if hashes is None:
            if tokens is None and query is not None and self.tokenize is not None:
                self.metrics.kv_tokenized.labels(role, "engine").inc()
                tokens = await self.tokenize(role, query)
                if tokens is None:
                    self.metrics.kv_tokenize_failures.labels(role).inc()
            if tokens is None:
                return None
            hashes = self._vllm.block_hashes(tokens, self.settings.block_size, salt)
        self.metrics.kv_hashing.observe(time.perf_counter() - started)
        return Affinity(self, role, hashes, next(self._keys))

    def use_tokenizer(self, prompts: HfPrompts | None) -> None:
        """Tokenize prompts with `prompts` from now on (None: through the engines)."""
        assert self._vllm is not None, "the router's tokenizer is for vLLM engines"
        self.prompts = prompts
        self._prompt_hasher = (
            None
            if prompts is None
            else PromptHasher(
                self.settings.block_size,
                chain_kind=VllmChain(self.settings.block_size, self._vllm, prompts),
            )
        )
        self.metrics.kv_router_tokenizer.set(0 if prompts is None else 1)

    @staticmethod
    def _vllm_keys_known(body: dict[str, Any]) -> bool:
        """Whether vLLM keys this request's blocks by its tokens (and cache salt) alone: no
        multimodal parts. (LoRA adapters' names are refused before this: the router serves
        the one model.)"""
        messages = body.get("messages")
        return not isinstance(messages, list) or not any(
            isinstance(m, dict)
            and isinstance(m.get("content"), list)
            and any(not isinstance(p, dict) or p.get("type") != "text" for p in m["content"])
            for m in messages
        )

    async def _router_hashes(
        self, role: str, route: str, body: dict[str, Any], salt: str | None
    ) -> list[int] | None:
        prompts, hasher = self.prompts, self._prompt_hasher
        assert prompts is not None and hasher is not None and self._vllm is not None
        pieces = prompts.pieces(route, body)
        if pieces is None:
            return None
        if salt is not None:  # its own chain from the first block: nothing to share
            tokens = await asyncio.to_thread(prompts.tokens, pieces)
            hashes = self._vllm.block_hashes(tokens, self.settings.block_size, salt)
        else:
            texts = [i for i in hasher.new_pieces(pieces) if isinstance(pieces[i], str)]
            encoded = None
            if sum(len(pieces[i]) for i in texts) > THREAD_CHARS:
                ids = await asyncio.to_thread(prompts.encode_many, [str(pieces[i]) for i in texts])
                encoded = {i: (t, len(t)) for i, t in zip(texts, ids, strict=True)}
            hashes = hasher.hashes(pieces, encoded)
        self.metrics.kv_tokenized.labels(role, "router").inc()
        self._tokenized += 1
        n = self._tokenized
        first, every = self.checks
        if (n <= first or n % every == 0) and self.tokenize is not None:
            self._spawn(self._check(role, route, body, pieces))
        return hashes

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background; stop() cancels what is left."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(
        self, role: str, route: str, body: dict[str, Any], pieces: list[Piece]
    ) -> None:
        """Compare the router's tokens of one prompt with an engine's; on a difference, stop
        using the router's tokenizer (the routing would miss every cached prefix)."""
        prompts, (_, query) = self.prompts, tokenize_request(route, body)
        if prompts is None or query is None or self.tokenize is None:
            return
        engine = await self.tokenize(role, query)
        if engine is None or self.prompts is not prompts:
            return
        ours = await asyncio.to_thread(prompts.tokens, pieces)
        if ours == engine:
            self.metrics.kv_tokenizer_checks.labels("match").inc()
            return
        self.metrics.kv_tokenizer_checks.labels("mismatch").inc()
        at = next((i for i, (a, b) in enumerate(zip(ours, engine, strict=False)) if a != b),
                  min(len(ours), len(engine)))  # fmt: skip
        log.warning(
            "the router's tokenizer (%s) gave %d tokens for a %s prompt, an engine %d, first "
            "differing at token %d: prompts are tokenized by the engines' /tokenize from now on",
            self.settings.tokenizer, len(ours), route, len(engine), at,
        )  # fmt: skip
        self.use_tokenizer(None)

    async def _load_tokenizer(self, name: str) -> None:
        try:
            prompts = await asyncio.to_thread(
                HfPrompts.load, name, self.settings.tokenizer_revision
            )
        except Exception as exc:
            log.warning(
                "cannot load the tokenizer of %s (%s: %s); prompts are tokenized by the "
                "engines' /tokenize", name, type(exc).__name__, exc,
            )  # fmt: skip
            return
        self.use_tokenizer(prompts)
        log.info(
            "tokenizing prompts with the tokenizer of %s%s", name,
            "" if prompts.splits else " (whole texts: its added tokens cannot be cut at)",
        )  # fmt: skip

    def local_affinity(self, role: str, route: str, body: dict[str, Any]) -> Affinity | None:
        """`affinity` for engines that hash as the sim does (no I/O)."""
        started = time.perf_counter()
        pieces = prompt_pieces(route, body)
        if pieces is None:
            return None
        hashes = self.hasher.hashes(pieces)
        self.metrics.kv_hashing.observe(time.perf_counter() - started)
        return Affinity(self, role, hashes, next(self._keys))

    def place(self, affinity: Affinity, candidates: list[Backend]) -> Backend:
        started = time.perf_counter()
        planned = self.settings.kv_blocks.get(affinity.role, 0)
        # KV usage is a fraction (summed over ranks): in blocks, by the engine's own count
        # once scraped (the plan's figure is an estimate for the NPU it was planned for).
        busy = {b.url: b.kv_usage * (b.kv_blocks or planned) for b in candidates}
        for b in candidates:
            if self._readings.get(b.url) != b.scrapes:
                self._readings[b.url] = b.scrapes
                self.policy.read(b.url)
        urls = [b.url for b in candidates]
        choice = self.policy.choose(affinity.key, affinity.hashes, urls, busy)
        affinity.placed = True
        m = self.metrics
        m.kv_decisions.labels(affinity.role, choice.reason).inc()
        m.kv_prompt_blocks.labels(affinity.role, choice.instance).inc(len(affinity.hashes))
        m.kv_hit_blocks.labels(affinity.role, choice.instance).inc(choice.matched_blocks)
        m.kv_choosing.observe(time.perf_counter() - started)
        return candidates[urls.index(choice.instance)]

    # ------------------------------------------------------------------ membership

    def joined(self, role: str, url: str) -> None:
        """An instance joined: follow its KV events (precise mode)."""
        if self.settings.mode != "precise" or url in self.subscribers or not self._started:
            return
        # One stream per data-parallel rank, all counted as the instance's cache.
        streams = self.settings.endpoints(role, url, self.backends)
        self.subscribers[url] = [
            KvEventSubscriber(
                where.endpoint,
                lambda events, url=url: self._apply(url, events),
                replay_endpoint=where.replay_endpoint,
                topic=self.settings.topic,
            )
            for where in streams
        ]
        for subscriber in self.subscribers[url]:
            subscriber.start()
        log.info(
            "following the KV events of %s instance %s at %s",
            role, url, ", ".join(w.endpoint for w in streams),
        )  # fmt: skip

    def left(self, role: str, url: str) -> None:
        """An instance left: nothing of it stays in the index."""
        self.policy.forget(url)
        self._readings.pop(url, None)
        for gauge in (self.metrics.kv_index_blocks, self.metrics.kv_event_gaps,
                      self.metrics.kv_event_restarts):  # fmt: skip
            with contextlib.suppress(KeyError):
                gauge.remove(url)
        for subscriber in self.subscribers.pop(url, []):
            asyncio.get_running_loop().create_task(subscriber.close())

    def _apply(self, url: str, events: list[KvEvent]) -> None:
        self.policy.apply(url, events)

    async def start(self, members: list[tuple[str, str]]) -> None:
        self._started = True
        for role, url in members:
            self.joined(role, url)
        name = self.settings.tokenizer
        if name and self._vllm is not None and self.prompts is None:
            self._spawn(self._load_tokenizer(name))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        subscribers, self.subscribers = self.subscribers, {}
        await asyncio.gather(*(s.close() for subs in subscribers.values() for s in subs))

    def observe(self) -> None:
        """Set the gauges that describe the index and the event streams (at scrape time)."""
        m = self.metrics
        for url in self.policy.index.instances():
            m.kv_index_blocks.labels(url).set(self.policy.index.size(url))
        for url, subs in self.subscribers.items():
            m.kv_event_gaps.labels(url).set(sum(s.gaps for s in subs))
            m.kv_event_restarts.labels(url).set(sum(s.restarts for s in subs))
