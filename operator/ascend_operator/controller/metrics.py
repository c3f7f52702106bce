"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("ascend_serve_operator_reconciles", "Reconcile passes by result.", ["result"])
ERRORS = Counter("ascend_serve_operator_api_errors", "API errors that failed a pass.", ["status"])
WRITES = Counter("ascend_serve_operator_writes", "Objects applied or deleted.", ["verb"])
DURATION = Histogram(
    "ascend_serve_operator_reconcile_duration_seconds",
    "Duration of one reconcile pass.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LWS_AVAILABLE = Gauge(
    "ascend_serve_operator_leaderworkerset_available",
    "Whether the operator sees the LeaderWorkerSet CRD installed (1) or not (0).",
)
