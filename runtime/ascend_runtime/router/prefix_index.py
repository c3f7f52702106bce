"""Where each prompt prefix lives: block hashes (kv.block_hash) per engine instance, and the
kv-aware choice built on it.

The index is fed either by the engines' KV events (precise: BlockStored / BlockRemoved /
AllBlocksCleared, exactly what each instance caches) or by the router's own routing history
(approximate: a prompt sent to an instance is assumed cached there until the instance's
share of the index is full, least recently used first). Memory is bounded either way: at most
`capacity` hashes per instance.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..kv.cache_events import BlockRemoved, BlockStored, KvEvent


@dataclass
class PrefixIndex:
    """Block hashes each instance holds, least recently used first per instance."""

    capacity: int = 1_000_000
    """Hashes kept per instance; beyond it the least recently used are forgotten."""
    _held: dict[str, OrderedDict[int, None]] = field(default_factory=dict)
    _owners: dict[int, set[str]] = field(default_factory=dict)

    def stored(self, instance: str, hashes: Iterable[int]) -> None:
        """The instance holds these blocks now (most recently used)."""
        held = self._held.setdefault(instance, OrderedDict())
        for h in hashes:
            if h in held:
                held.move_to_end(h)
                continue
            held[h] = None
            self._owners.setdefault(h, set()).add(instance)
        while len(held) > self.capacity:
            old, _ = held.popitem(last=False)
            self._forget(old, instance)

    def removed(self, instance: str, hashes: Iterable[int]) -> None:
        held = self._held.get(instance)
        if held is None:
            return
        for h in hashes:
            if h in held:
                del held[h]
                self._forget(h, instance)

    def cleared(self, instance: str) -> None:
        """The instance dropped everything (AllBlocksCleared, a restart, or it left)."""
        for h in self._held.pop(instance, {}):
            self._forget(h, instance)

    def instances(self) -> list[str]:
        return list(self._held)

    def held(self, instance: str, h: int) -> bool:
        return h in self._held.get(instance, ())

    def size(self, instance: str | None = None) -> int:
        if instance is not None:
            return len(self._held.get(instance, ()))
        return sum(len(held) for held in self._held.values())

    def matches(self, hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """How many leading blocks of `hashes` each candidate holds (a chain: block i counts
        only if blocks 0..i-1 do)."""
        result = dict.fromkeys(candidates, 0)
        alive = set(result)
        for depth, h in enumerate(hashes):
            alive &= self._owners.get(h, set())
            if not alive:
                break
            for instance in alive:
                result[instance] = depth + 1
        return result

    def touch(self, instance: str, hashes: Sequence[int]) -> None:
        """A request reused these blocks: keep them from being forgotten first."""
        held = self._held.get(instance)
        if held is not None:
            for h in hashes:
                if h in held:
                    held.move_to_end(h)

    def _forget(self, h: int, instance: str) -> None:
        owners = self._owners.get(h)
        if owners is not None:
            owners.discard(instance)
            if not owners:
                del self._owners[h]


@dataclass(frozen=True)
class Choice:
    """A kv-aware decision: the instance, the blocks it already holds, and why."""

    instance: str
    matched_blocks: int
    reason: str
    """"prefix" (the cache decided), "load" (no useful hit; least loaded) or "spill" (a hit
    elsewhere was outweighed by that instance's load)."""


def choose(
    prompt_blocks: int,
    matched: dict[str, int],
    load_blocks: dict[str, float],
    load_weight: float = 1.0,
    held: dict[str, int] | None = None,
) -> Choice:
    """The instance with the least estimated work: blocks this prompt would prefill there
    (its uncached blocks) plus `load_weight` times the blocks of the requests it is already
    serving (NVIDIA Dynamo's KV router weighs the same two terms). A hot prefix therefore
    spreads once its instance's queue costs more than recomputing the prefix elsewhere.
    Ties go to the longer match, then the lighter load, then the instance that caches least
    (`held` blocks: new prefixes spread over the caches of idle instances), then the order of
    `matched`."""
    order = {name: i for i, name in enumerate(matched)}
    held = held or {}

    def cost(name: str) -> tuple[float, int, float, int, int]:
        work = (prompt_blocks - matched[name]) + load_weight * load_blocks.get(name, 0.0)
        return (work, -matched[name], load_blocks.get(name, 0.0), held.get(name, 0), order[name])

    best = min(matched, key=cost)
    deepest = max(matched.values(), default=0)
    if deepest == 0:
        reason = "load"
    elif matched[best] == deepest:
        reason = "prefix"
    else:
        reason = "spill"
    return Choice(best, matched[best], reason)


@dataclass
class KvAwarePolicy:
    """The kv-aware policy's state: the prefix index, the prefill work the router has sent each
    instance and not yet seen answered, and its decisions.

    `approximate`: a routed prompt counts as cached on its instance at once (routing history).
    `precise`: the index follows the instance's KV events only. A prompt routed there counts
    as on its way until its first token is back, and for `confirm_seconds` after, unless the
    instance's events confirm its blocks first: the event of a step and the token it produced
    travel on different sockets, so a burst sharing a new prefix does not scatter meanwhile."""

    mode: str = "precise"
    capacity: int = 1_000_000
    decode_weight: float = 0.25
    """Blocks of prefill work one KV block in use is worth: decode steps read every block
    in use, and an instance near a full cache preempts."""
    confirm_seconds: float = 2.0
    clock: Callable[[], float] = time.monotonic
    index: PrefixIndex = field(init=False)
    reasons: dict[str, int] = field(default_factory=dict)
    _pending_work: dict[str, float] = field(default_factory=dict)
    _pending_hashes: dict[str, dict[int, int]] = field(default_factory=dict)
    _unconfirmed: dict[str, dict[int, float]] = field(default_factory=dict)
    """Per instance: hashes prefilled there whose BlockStored has not arrived, and until when
    they count anyway."""
    _sent: dict[object, tuple[str, int, list[int]]] = field(default_factory=dict)
    _active: dict[str, float] = field(default_factory=dict)
    """Per instance: prompt blocks of the requests placed there and not finished (the
    router's own, known at once; the engines' KV usage arrives a scrape later)."""
    _active_of: dict[object, tuple[str, int]] = field(default_factory=dict)
    _active_at_reading: dict[str, float] = field(default_factory=dict)
    """Per instance: _active when its `busy` was last read (see read)."""

    def __post_init__(self) -> None:
        if self.mode not in ("approximate", "precise"):
            raise ValueError(f"kv-aware mode {self.mode!r}: use approximate or precise")
        self.index = PrefixIndex(capacity=self.capacity)

    def choose(
        self, key: object, hashes: list[int], candidates: list[str], busy: dict[str, float]
    ) -> Choice:
        """Pick an instance for the request `key` whose prompt has these block hashes;
        `busy`: each candidate's decode load in blocks (its KV blocks in use, as its metrics
        last reported them; see read), weighed by `decode_weight`, plus the prompt blocks of
        the requests this router placed there since that reading, less those it saw finish.
        A key placed again (a retry) leaves its earlier instance."""
        self.finished(key)
        matched = self.index.matches(hashes, candidates)
        for name in candidates:
            matched[name] = max(matched[name], self._expected_depth(name, hashes))
        load = {
            n: self._pending_work.get(n, 0.0) + self.decode_weight * self._decode_load(n, busy)
            for n in candidates
        }
        held = {n: self.index.size(n) + len(self._unconfirmed.get(n, ())) for n in candidates}
        choice = choose(len(hashes), matched, load, held=held)
        name, work = choice.instance, len(hashes) - choice.matched_blocks
        self._pending_work[name] = self._pending_work.get(name, 0.0) + work
        if self.mode == "approximate":
            self.index.stored(name, hashes)
        else:
            pending = self._pending_hashes.setdefault(name, {})
            for h in hashes:
                pending[h] = pending.get(h, 0) + 1
        self._sent[key] = (name, work, hashes if self.mode == "precise" else [])
        self._active[name] = self._active.get(name, 0.0) + len(hashes)
        self._active_of[key] = (name, len(hashes))
        self.reasons[choice.reason] = self.reasons.get(choice.reason, 0) + 1
        return choice

    def _expected_depth(self, name: str, hashes: list[int]) -> int:
        """Leading blocks on their way to `name` or prefilled there and not yet confirmed."""
        pending = self._pending_hashes.get(name) or {}
        unconfirmed = self._unconfirmed.get(name) or {}
        if not pending and not unconfirmed:
            return 0
        now, depth = self.clock(), 0
        for h in hashes:
            if not pending.get(h):
                until = unconfirmed.get(h)
                if until is None or until < now:
                    break
            depth += 1
        return depth

    def _decode_load(self, name: str, busy: dict[str, float]) -> float:
        """The instance's reading, plus what was placed there since, less what finished."""
        since = self._active.get(name, 0.0) - self._active_at_reading.get(name, 0.0)
        return max(0.0, busy.get(name, 0.0) + since)

    def read(self, instance: str) -> None:
        """A fresh reading of the instance's KV usage arrived: it holds every request placed
        so far (what was placed and finished after it is added and taken off by choose)."""
        self._active_at_reading[instance] = self._active.get(instance, 0.0)

    def finished(self, key: object) -> None:
        """The request ended (answered, failed or cut): its prefill is over, and its blocks
        no longer load its instance."""
        self.prefilled(key)
        placed = self._active_of.pop(key, None)
        if placed is not None:
            name, blocks = placed
            left = self._active.get(name, 0.0) - blocks
            if left > 0:
                self._active[name] = left
            else:
                self._active.pop(name, None)

    def prefilled(self, key: object) -> None:
        """The request's first token came back: its prefill work is done."""
        sent = self._sent.pop(key, None)
        if sent is None:
            return
        name, work, hashes = sent
        self._pending_work[name] = self._pending_work.get(name, 0.0) - work
        pending = self._pending_hashes.get(name, {})
        unconfirmed = self._unconfirmed.setdefault(name, {}) if hashes else {}
        until = self.clock() + self.confirm_seconds
        for h in hashes:
            left = pending.get(h, 0) - 1
            if left > 0:
                pending[h] = left
            else:
                pending.pop(h, None)
                if self.index.held(name, h):
                    unconfirmed.pop(h, None)
                else:
                    unconfirmed[h] = until
        if len(unconfirmed) > self.capacity:  # events that never came: drop the expired
            now = self.clock()
            for h in [h for h, t in unconfirmed.items() if t < now]:
                del unconfirmed[h]

    def apply(self, instance: str, events: Iterable[KvEvent]) -> None:
        """An instance's KV events, in order (precise mode's feed)."""
        for event in events:
            if isinstance(event, BlockStored):
                self.index.stored(instance, event.block_hashes)
                unconfirmed = self._unconfirmed.get(instance)
                if unconfirmed:
                    for h in event.block_hashes:
                        unconfirmed.pop(h, None)
            elif isinstance(event, BlockRemoved):
                self.index.removed(instance, event.block_hashes)
            else:
                self.index.cleared(instance)

    def forget(self, instance: str) -> None:
        """The instance left (or restarted): nothing of it stays in the index."""
        self.index.cleared(instance)
        self._pending_work.pop(instance, None)
        self._pending_hashes.pop(instance, None)
        self._unconfirmed.pop(instance, None)
        for key in [k for k, (name, _, _) in self._sent.items() if name == instance]:
            del self._sent[key]
        self._active.pop(instance, None)
        self._active_at_reading.pop(instance, None)
        for key in [k for k, (name, _) in self._active_of.items() if name == instance]:
            del self._active_of[key]
