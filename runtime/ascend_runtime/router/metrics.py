"""The router's Prometheus metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
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
        self._requests: dict[tuple[str, str], Any] = {}

    def request_done(self, route: str, code: int) -> None:
        key = (route, str(code))
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()
