"""Health checks of the instances behind the router, and the engines' load figures."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from .pool import Backend, Pool


def parse_metric(text: str, name: str) -> float | None:
    """Sum of a metric's samples in Prometheus text format."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (len(line) > len(name) and line[len(name)] in " {"):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return total if found else None


def parse_label(text: str, name: str, label: str) -> str | None:
    """The value of `label` on a metric's first sample that has it (info-style gauges)."""
    key = f'{label}="'
    for line in text.splitlines():
        if line.startswith(name + "{") and key in line:
            return line.split(key, 1)[1].split('"', 1)[0]
    return None


def kv_blocks(metrics: str) -> int | None:
    """KV blocks per data-parallel rank, from vllm:cache_config_info's num_gpu_blocks."""
    value = parse_label(metrics, "vllm:cache_config_info", "num_gpu_blocks")
    return int(value) if value is not None and value.isdigit() else None


class HealthChecker:
    """Probes every instance's /health (the pool's FailurePolicy decides what a failure
    does); scrapes /metrics of healthy ones for KV usage and queue length."""

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
        policy = self.pool.failures
        timeout = aiohttp.ClientTimeout(total=policy.health_timeout_seconds)
        try:
            async with self.session.get(f"{backend.url}/health", timeout=timeout) as response:
                status = response.status
        except TimeoutError:
            policy.probe_failed(
                backend,
                f"/health gave no answer within {policy.health_timeout_seconds:g} s",
                timed_out=True,
            )
            return
        except aiohttp.ClientError as exc:
            policy.probe_failed(backend, f"/health: {exc!r}", timed_out=False)
            return
        if status != 200:
            policy.probe_failed(backend, f"/health answered {status}", timed_out=False)
            return
        policy.probe_passed(backend)
        if backend.ejected:
            return
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.session.get(f"{backend.url}/metrics", timeout=timeout) as r:
                metrics = await r.text()
            backend.kv_usage = parse_metric(metrics, "vllm:kv_cache_usage_perc") or 0.0
            backend.scrapes += 1
            backend.waiting = parse_metric(metrics, "vllm:num_requests_waiting") or 0.0
            backend.kv_blocks = kv_blocks(metrics) or backend.kv_blocks

    async def check_all(self) -> None:
        backends = [b for role in list(self.pool.backends) for b in self.pool.members(role)]
        await asyncio.gather(*(self.check(b) for b in backends))

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)
