"""Engine instances behind the router: balancing, health checks, ejection, KV-usage scraping."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger("ascend_runtime.router")

EJECT_SECONDS = 5.0
"""How long a failed instance stays out before the health check may re-admit it."""


@dataclass
class Backend:
    """One engine instance (its leader's base URL)."""

    url: str
    role: str
    outstanding: int = 0
    healthy: bool = True
    kv_usage: float = 0.0
    waiting: float = 0.0
    ejected_until: float = 0.0
    failures: int = 0
    served: int = 0
    last_error: str | None = None

    @property
    def available(self) -> bool:
        return self.healthy and time.monotonic() >= self.ejected_until


@dataclass
class Pool:
    """Instances per role and the balancing policy over them."""

    policy: str = "least-outstanding"
    backends: dict[str, dict[str, Backend]] = field(default_factory=dict)
    _turns: dict[str, itertools.count[int]] = field(default_factory=dict)

    def set_members(self, role: str, urls: Iterable[str]) -> None:
        """Replace a role's membership, keeping state of instances that stay."""
        current = self.backends.setdefault(role, {})
        wanted = list(dict.fromkeys(u.rstrip("/") for u in urls))  # ordered, no repeats
        for url in list(current):
            if url not in wanted:
                del current[url]
        for url in wanted:
            current.setdefault(url, Backend(url=url, role=role))

    def add(self, role: str, url: str) -> Backend:
        return self.backends.setdefault(role, {}).setdefault(
            url.rstrip("/"), Backend(url=url.rstrip("/"), role=role)
        )

    def remove(self, role: str, url: str) -> bool:
        return self.backends.get(role, {}).pop(url.rstrip("/"), None) is not None

    def members(self, role: str) -> list[Backend]:
        return list(self.backends.get(role, {}).values())

    def pick(self, role: str, exclude: set[str] | frozenset[str] = frozenset()) -> Backend | None:
        """Least outstanding requests (KV usage breaks ties), or round robin."""
        candidates = [b for b in self.members(role) if b.available and b.url not in exclude]
        if not candidates:
            return None
        turn = next(self._turns.setdefault(role, itertools.count()))
        if self.policy == "round-robin":
            return candidates[turn % len(candidates)]
        n = len(candidates)
        ranked = sorted(
            range(n),
            key=lambda i: (
                candidates[i].outstanding,
                candidates[i].kv_usage,
                candidates[i].waiting,
                (i - turn) % n,
            ),
        )
        return candidates[ranked[0]]

    def eject(self, backend: Backend, reason: str) -> None:
        backend.ejected_until = time.monotonic() + EJECT_SECONDS
        backend.failures += 1
        backend.last_error = reason
        if backend.healthy:
            log.warning("ejecting %s instance %s: %s", backend.role, backend.url, reason)
        backend.healthy = False


def parse_metric(text: str, name: str) -> float | None:
    """Sum of a metric's samples in Prometheus text format."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (len(line) > len(name) and line[len(name)] in " {"):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return total if found else None


class HealthChecker:
    """Probes every instance's /health; scrapes /metrics for KV usage and queue length."""

    def __init__(self, pool: Pool, session: aiohttp.ClientSession, interval: float = 2.0):
        self.pool, self.session, self.interval = pool, session, interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="router-health")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self, backend: Backend) -> None:
        timeout = aiohttp.ClientTimeout(total=2.0)
        try:
            async with self.session.get(f"{backend.url}/health", timeout=timeout) as response:
                ok = response.status == 200
        except (TimeoutError, aiohttp.ClientError) as exc:
            ok, backend.last_error = False, repr(exc)
        if ok and time.monotonic() >= backend.ejected_until:
            if not backend.healthy:
                log.info("re-admitting %s instance %s", backend.role, backend.url)
            backend.healthy, backend.last_error = True, None
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self.session.get(f"{backend.url}/metrics", timeout=timeout) as r:
                    metrics = await r.text()
                backend.kv_usage = parse_metric(metrics, "vllm:kv_cache_usage_perc") or 0.0
                backend.waiting = parse_metric(metrics, "vllm:num_requests_waiting") or 0.0
        elif not ok:
            backend.healthy = False

    async def check_all(self) -> None:
        backends = [b for role in list(self.pool.backends) for b in self.pool.members(role)]
        await asyncio.gather(*(self.check(b) for b in backends))

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)
