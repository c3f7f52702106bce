"""Prefill-side bookkeeping of KV held for decode ranks to pull.

A request's blocks stay held until every expected (prefill rank, decode rank) pair reported
done, the hold timed out, or the request was aborted; then `release` runs exactly once.
Transport-agnostic and clock-injectable, so the fault cases are tested without sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Pair = tuple[int, int]  # (prefill rank, decode rank)


class KvTransferError(Exception):
    """A KV transfer failed; `code` is machine-readable (kv_not_found, duplicate, timeout...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Hold:
    request_id: str
    deadline: float
    expected: set[Pair] | None = None
    done: set[Pair] = field(default_factory=set)


@dataclass
class HoldStats:
    held: int = 0
    completed: int = 0
    expired: int = 0
    aborted: int = 0
    duplicates: int = 0


class Holds:
    """Requests whose KV is held; `release(request_id)` frees their blocks."""

    def __init__(
        self,
        release: Callable[[str], None],
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if timeout <= 0:
            raise ValueError(f"KV hold timeout must be > 0 seconds, got {timeout}")
        self._release, self.timeout, self._clock = release, timeout, clock
        self._holds: dict[str, Hold] = {}
        self.stats = HoldStats()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._holds

    def __len__(self) -> int:
        return len(self._holds)

    def hold(self, request_id: str) -> None:
        if request_id in self._holds:
            raise KvTransferError("duplicate", f"KV of request {request_id} is already held")
        self._holds[request_id] = Hold(request_id, self._clock() + self.timeout)
        self.stats.held += 1

    def get(self, request_id: str) -> Hold:
        hold = self._holds.get(request_id)
        if hold is None:
            raise KvTransferError(
                "kv_not_found",
                f"no KV held for request {request_id}: it expired after {self.timeout:g} s, "
                "was completed or aborted, or never finished prefill here",
            )
        return hold

    def expect(self, request_id: str, pairs: Iterable[Pair]) -> None:
        """Record which (prefill rank, decode rank) pairs will report; the first reader sets
        it, later readers must agree (they all compute it from the same rank map)."""
        hold = self.get(request_id)
        wanted = {(int(p), int(d)) for p, d in pairs}
        if hold.expected is None:
            hold.expected = wanted
        elif hold.expected != wanted:
            raise KvTransferError(
                "plan_mismatch",
                f"decode ranks disagree on who pulls request {request_id}'s KV: "
                "their prefill/decode parallelism settings differ",
            )
        self._maybe_complete(hold)

    def done(self, request_id: str, pair: Pair) -> bool:
        """Record one pair's completion; True when that released the request."""
        hold = self.get(request_id)
        pair = (int(pair[0]), int(pair[1]))
        if pair in hold.done:
            self.stats.duplicates += 1
            raise KvTransferError(
                "duplicate", f"rank pair {pair} already reported request {request_id} done"
            )
        if hold.expected is not None and pair not in hold.expected:
            raise KvTransferError(
                "unexpected", f"rank pair {pair} is not among request {request_id}'s pullers"
            )
        hold.done.add(pair)
        return self._maybe_complete(hold)

    def abort(self, request_id: str) -> bool:
        """Release a request now (cancelled, or its decode side gave up); False if not held."""
        if request_id not in self._holds:
            return False
        self._finish(request_id)
        self.stats.aborted += 1
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Release every hold past its deadline; returns their request ids."""
        now = self._clock() if now is None else now
        gone = [rid for rid, h in self._holds.items() if h.deadline <= now]
        for rid in gone:
            self._finish(rid)
        self.stats.expired += len(gone)
        return gone

    def release_all(self) -> None:
        for rid in list(self._holds):
            self._finish(rid)

    def _maybe_complete(self, hold: Hold) -> bool:
        if hold.expected is not None and hold.done >= hold.expected:
            self._finish(hold.request_id)
            self.stats.completed += 1
            return True
        return False

    def _finish(self, request_id: str) -> None:
        self._holds.pop(request_id)
        self._release(request_id)
