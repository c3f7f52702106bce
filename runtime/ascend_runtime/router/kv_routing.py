"""Router policy kv-aware: each request's prompt hashed into blocks, its instance chosen by
where those blocks are cached (prefix_index.KvAwarePolicy; in PD the prefill instance, then
the decode instance), and in precise mode the engines' KV events followed, one subscriber per
instance, started and stopped with the membership."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import KvAwareRouting, RouterBackends
from ..kv.cache_events import KvEvent
from ..kv.events import KvEventSubscriber
from ..kv.vllm_hash import VllmBlockHasher
from .metrics import RouterMetrics
from .policy import Backend
from .prefix_index import KvAwarePolicy
from .prompt_hashes import PromptHasher, prompt_pieces, tokenize_request

Tokenize = Callable[[str, dict[str, Any]], Awaitable[list[int] | None]]
"""(role, /tokenize body) -> the token ids an engine of the role gives, None when it could
not answer."""

log = logging.getLogger("ascend_runtime.router")


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
    _vllm: VllmBlockHasher | None = field(init=False, default=None)
    _keys: itertools.count[int] = field(default_factory=itertools.count)
    _started: bool = False

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
        tokens, query = tokenize_request(route, body)
        if tokens is None and query is not None and self.tokenize is not None:
            tokens = await self.tokenize(role, query)
            if tokens is None:
                self.metrics.kv_tokenize_failures.labels(role).inc()
        if tokens is None:
            return None
        hashes = self._vllm.block_hashes(tokens, self.settings.block_size)
        self.metrics.kv_hashing.observe(time.perf_counter() - started)
        return Affinity(self, role, hashes, next(self._keys))

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

    async def stop(self) -> None:
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
