"""Engine instances behind the router, per role, and the balancing policy over them."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .policy import Backend, FailurePolicy

log = logging.getLogger("ascend_runtime.router")

__all__ = ["Backend", "Chooser", "MemberListener", "Pool"]


class Chooser(Protocol):
    """A request's own preference among the instances in rotation (kv-aware's Affinity)."""

    def choose(self, candidates: list[Backend]) -> Backend: ...


class MemberListener(Protocol):
    """Told when an instance joins or leaves a role."""

    def joined(self, role: str, url: str) -> None: ...

    def left(self, role: str, url: str) -> None: ...


@dataclass
class Pool:
    """Instances per role and the balancing policy over them."""

    policy: str = "least-outstanding"
    failures: FailurePolicy = field(default_factory=FailurePolicy)
    backends: dict[str, dict[str, Backend]] = field(default_factory=dict)
    fallback_picks: int = 0
    """Requests sent to an ejected instance because every instance of the role was out."""
    listeners: list[MemberListener] = field(default_factory=list)
    _turns: dict[str, itertools.count[int]] = field(default_factory=dict)

    def set_members(self, role: str, urls: Iterable[str]) -> None:
        """Replace a role's membership, keeping state of instances that stay."""
        current = self.backends.setdefault(role, {})
        wanted = list(dict.fromkeys(u.rstrip("/") for u in urls))  # ordered, no repeats
        for url in list(current):
            if url not in wanted:
                self.remove(role, url)
        for url in wanted:
            self.add(role, url)

    def add(self, role: str, url: str) -> Backend:
        url = url.rstrip("/")
        members = self.backends.setdefault(role, {})
        backend = members.get(url)
        if backend is None:
            backend = members[url] = Backend(url=url, role=role)
            for listener in self.listeners:
                listener.joined(role, url)
        return backend

    def remove(self, role: str, url: str) -> bool:
        url = url.rstrip("/")
        if self.backends.get(role, {}).pop(url, None) is None:
            return False
        for listener in self.listeners:
            listener.left(role, url)
        return True

    def members(self, role: str) -> list[Backend]:
        return list(self.backends.get(role, {}).values())

    def pick(
        self,
        role: str,
        exclude: set[str] | frozenset[str] = frozenset(),
        chooser: Chooser | None = None,
    ) -> Backend | None:
        """The request's `chooser` (kv-aware) decides among the instances in rotation when it
        is given; otherwise least outstanding requests (KV usage, then queue length break
        ties), or round robin. With none in rotation, the one that failed longest ago (a role
        is never empty while it has members). None: no member left outside `exclude`."""
        members = [b for b in self.members(role) if b.url not in exclude]
        candidates = [b for b in members if b.available]
        if not candidates:
            backend = self.failures.fallback(members)
            if backend is not None:
                self.fallback_picks += 1
                log.debug("every %s instance is out; trying %s", role, backend.url)
            return backend
        if chooser is not None:
            return chooser.choose(candidates)
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
