"""When the router takes an instance out of rotation, when it lets it back, and which
failures it retries: the rules in one place, as plain methods over `Backend` state."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("ascend_runtime.router")

UPSTREAM_KEEPALIVE_SECONDS = 4.0
"""Idle upstream connections are dropped after this. It must stay below the engines' own idle
timeout, or the router reuses a connection at the moment the engine closes it: uvicorn (vLLM's
API server, `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, and the sim engine) closes idle ones after 5 s."""


EJECTED = "ascend-serve: the instance was ejected"
"""The cancellation message of a wait that ejection interrupted."""


@dataclass
class Backend:
    """One engine instance (its leader's base URL) and what the router knows of its health."""

    url: str
    role: str
    outstanding: int = 0
    kv_usage: float = 0.0
    scrapes: int = 0
    """Metrics scrapes that set kv_usage (kv-aware tells a fresh reading by it)."""
    kv_blocks: int | None = None
    """KV blocks per rank as the engine reports them (vllm:cache_config_info), once known."""
    waiting: float = 0.0
    served: int = 0
    ejected: bool = False
    ejected_until: float = 0.0
    """While ejected: the earliest time a passing health check may re-admit it."""
    ejections: int = 0
    """Ejections in a row without a request succeeding in between (backs the period off)."""
    consecutive_failures: int = 0
    probe_failures: int = 0
    last_failure: float = 0.0
    last_error: str | None = None
    waiters: set[asyncio.Task[object]] = field(default_factory=set, repr=False)
    """Tasks waiting for this instance's first byte: ejection interrupts them (a request
    should not wait for an engine that is gone or frozen)."""

    @property
    def available(self) -> bool:
        return not self.ejected

    @property
    def healthy(self) -> bool:  # the name /instances has always shown
        return not self.ejected


@dataclass(frozen=True)
class FailurePolicy:
    """Ejection, re-admission and retry rules.

    A refused connection or a failed health check (an answer other than 200) ejects at once:
    nothing is serving there. Other failures (a reset or timed-out request, a health check
    that timed out, as a busy engine's can) eject only after `failures_to_eject` in a row, so
    one unlucky request does not empty a role. Only a passing health check, after the ejection
    period, re-admits; the period doubles for an instance that fails again right after
    (up to `max_eject_seconds`). Every ejection and re-admission is logged with its reason.
    """

    failures_to_eject: int = 3
    eject_seconds: float = 5.0
    max_eject_seconds: float = 60.0
    health_timeout_seconds: float = 5.0
    probe_timeouts_to_eject: int = 2
    retries_before_first_byte: int = 1
    """Retries of a request that failed before its first byte reached the client."""

    def succeeded(self, backend: Backend) -> None:
        """A request completed: the failure streak and the back-off reset."""
        backend.consecutive_failures = 0
        backend.ejections = 0

    def failed(
        self, backend: Backend, reason: str, *, definitive: bool = False, now: float | None = None
    ) -> bool:
        """Record a failed request; True when this failure ejected the instance."""
        backend.consecutive_failures += 1
        backend.last_failure = time.monotonic() if now is None else now
        backend.last_error = reason
        if backend.ejected:
            return False
        if definitive or backend.consecutive_failures >= self.failures_to_eject:
            streak = backend.consecutive_failures
            self._eject(backend, reason if streak == 1 else f"{streak} failures in a row: {reason}")
            return True
        return False

    def probe_failed(
        self, backend: Backend, reason: str, *, timed_out: bool, now: float | None = None
    ) -> bool:
        """Record a failed health check; True when it ejected the instance."""
        backend.probe_failures += 1
        backend.last_failure = time.monotonic() if now is None else now
        backend.last_error = reason
        if backend.ejected:
            # still down: keep it out at least one more period from now
            backend.ejected_until = max(backend.ejected_until, backend.last_failure)
            return False
        if timed_out and backend.probe_failures < self.probe_timeouts_to_eject:
            log.info(
                "%s instance %s: health check timed out (%d of %d before ejection)",
                backend.role,
                backend.url,
                backend.probe_failures,
                self.probe_timeouts_to_eject,
            )
            return False
        self._eject(backend, f"health check failed: {reason}")
        return True

    def probe_passed(self, backend: Backend, now: float | None = None) -> bool:
        """Record a passing health check; True when it re-admitted the instance."""
        backend.probe_failures = 0
        now = time.monotonic() if now is None else now
        if not backend.ejected or now < backend.ejected_until:
            return False
        backend.ejected, backend.consecutive_failures = False, 0
        log.warning(
            "re-admitting %s instance %s: health check passes (was out for: %s)",
            backend.role,
            backend.url,
            backend.last_error,
        )
        backend.last_error = None
        return True

    def eject(self, backend: Backend, reason: str) -> None:
        """Take an instance out now (an operator's or a test's decision)."""
        backend.last_error = reason
        if not backend.ejected:
            self._eject(backend, reason)

    def _eject(self, backend: Backend, reason: str) -> None:
        period = min(self.max_eject_seconds, self.eject_seconds * 2**backend.ejections)
        backend.ejections += 1
        backend.ejected = True
        backend.ejected_until = time.monotonic() + period
        log.warning(
            "ejecting %s instance %s for at least %.0f s: %s",
            backend.role,
            backend.url,
            period,
            reason,
        )
        waiters, backend.waiters = backend.waiters, set()
        for task in waiters:
            task.cancel(EJECTED)

    def fallback(self, members: list[Backend]) -> Backend | None:
        """With every instance of a role out, the one that failed longest ago: a request
        that might succeed beats a certain 503."""
        return min(members, key=lambda b: b.last_failure, default=None)
