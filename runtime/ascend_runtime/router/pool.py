"""Engine instances behind the router, per role, and the balancing policy over them."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from .policy import Backend, FailurePolicy

log = logging.getLogger("ascend_runtime.router")

__all__ = ["Backend", "Pool"]


@dataclass
class Pool:
    """Instances per role and the balancing policy over them."""

    policy: str = "least-outstanding"
    failures: FailurePolicy = field(default_factory=FailurePolicy)
    backends: dict[str, dict[str, Backend]] = field(default_factory=dict)
    fallback_picks: int = 0
    """Requests sent to an ejected instance because every instance of the role was out."""
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
        """Least outstanding requests (KV usage, then queue length break ties), or round
        robin, among instances in rotation; with none in rotation, the one that failed
        longest ago (a role is never empty while it has members). None: no member left
        outside `exclude`."""
        members = [b for b in self.members(role) if b.url not in exclude]
        candidates = [b for b in members if b.available]
        if not candidates:
            backend = self.failures.fallback(members)
            if backend is not None:
                self.fallback_picks += 1
                log.debug("every %s instance is out; trying %s", role, backend.url)
            return backend
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
        self.failures.eject(backend, reason)
