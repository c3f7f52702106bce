"""The router's Prometheus metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip

DECISION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
)  # fmt: skip

CLIENT_CLOSED = 499
"""The code requests are counted under when the client left before the answer was complete
(nginx's convention; nothing is sent with it)."""


class RouterMetrics:
    """Counters, gauges and histograms of one router, in their own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "ascend_serve_router_requests",
            "Requests answered, by route and HTTP code (499: the client left first).",
            ["route", "code"],
            registry=r,
        )
        self.errors = Counter(
            "ascend_serve_router_errors", "Upstream failures by kind.", ["kind", "role"], registry=r
        )
        self.retries = Counter(
            "ascend_serve_router_retries",
            "Requests sent again (another instance or a fresh connection).",
            ["role"],
            registry=r,
        )
        self.fallbacks = Counter(
            "ascend_serve_router_fallback_picks",
            "Requests sent to an ejected instance because its whole role was out.",
            ["role"],
            registry=r,
        )
        self.inflight = Gauge(
            "ascend_serve_router_inflight_requests", "Requests in flight.", registry=r
        )
        self.ttft = Histogram(
            "ascend_serve_router_time_to_first_token_seconds",
            "Time to the first streamed byte (client view).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "ascend_serve_router_upstream_latency_seconds",
            "Upstream response time (headers) per instance.",
            ["role", "instance"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.healthy = Gauge(
            "ascend_serve_router_healthy_instances", "Instances in rotation.", ["role"], registry=r
        )
        self.kv_decisions = Counter(
            "ascend_serve_router_kv_decisions",
            "kv-aware placements by reason: prefix (the longest cached prefix won), load (no "
            "instance held any of the prompt), spill (a cached prefix lost to its instance's "
            "load).",
            ["role", "reason"],
            registry=r,
        )
        self.kv_prompt_blocks = Counter(
            "ascend_serve_router_kv_prompt_blocks",
            "Full prompt blocks placed on each engine instance (its base URL; not `instance`, "
            "which Prometheus gives the scraped target) by the kv-aware policy.",
            ["role", "engine"],
            registry=r,
        )
        self.kv_hit_blocks = Counter(
            "ascend_serve_router_kv_hit_blocks",
            "Of those, blocks the router expected cached there (hit rate: hit / prompt blocks).",
            ["role", "engine"],
            registry=r,
        )
        self.kv_hashing = Histogram(
            "ascend_serve_router_kv_hashing_seconds",
            "Tokenizing and hashing one prompt (kv-aware).",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.kv_choosing = Histogram(
            "ascend_serve_router_kv_choice_seconds",
            "Choosing one instance from the prefix index (kv-aware).",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.kv_tokenize_failures = Counter(
            "ascend_serve_router_kv_tokenize_failures",
            "Prompts the engines' /tokenize did not answer for (placed by load instead).",
            ["role"],
            registry=r,
        )
        self.kv_tokenized = Counter(
            "ascend_serve_router_kv_tokenized",
            "Prompts tokenized for kv-aware routing over vLLM engines, by where: `router` (the "
            "model's tokenizer in the router) or `engine` (an engine's /tokenize).",
            ["role", "where"],
            registry=r,
        )
        self.kv_tokenizer_checks = Counter(
            "ascend_serve_router_kv_tokenizer_checks",
            "Sampled prompts whose router tokens were compared with an engine's /tokenize, by "
            "result (`match`, `mismatch`: the router stops using its tokenizer).",
            ["result"],
            registry=r,
        )
        self.kv_router_tokenizer = Gauge(
            "ascend_serve_router_kv_router_tokenizer",
            "1 while the router tokenizes prompts itself (kv-aware over vLLM engines).",
            registry=r,
        )
        self.kv_index_blocks = Gauge(
            "ascend_serve_router_kv_index_blocks",
            "Block hashes the router holds for each instance.",
            ["engine"],
            registry=r,
        )
        self.kv_event_gaps = Gauge(
            "ascend_serve_router_kv_event_gaps",
            "Gaps in an instance's KV-event sequence since the router started (each replayed, "
            "or the instance's entries cleared).",
            ["engine"],
            registry=r,
        )
        self.kv_event_restarts = Gauge(
            "ascend_serve_router_kv_event_restarts",
            "Times an instance's KV-event sequence started over (an engine restart).",
            ["engine"],
            registry=r,
        )
        self._requests: dict[tuple[str, str], Any] = {}

    def request_done(self, route: str, code: int) -> None:
        key = (route, str(code))
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()
