"""Which host block holds which prefix hash: the bookkeeping half of KV offload, without torch.

vLLM splits offloading in two: a manager in the scheduler process decides what is stored where,
and handlers in the worker processes copy. `HostBlockIndex` is that manager's state (LRU by
prefix hash, bounded in blocks, entries invisible while stored and pinned while loaded);
`offload.HostKvPool` pairs it with the copies for single-process use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass
class OffloadStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    stored_blocks: int = 0
    loaded_blocks: int = 0
    evicted_blocks: int = 0
    rejected_blocks: int = 0
    """Stores skipped because every host block was busy (being stored or loaded)."""
    failed_blocks: int = 0
    """Stores that did not complete (their host blocks went back to the free list)."""
    bytes_to_host: int = 0
    bytes_to_device: int = 0


@dataclass
class _Entry:
    block: int
    ready: bool = False
    readers: int = 0


@dataclass
class StorePlan:
    """What `prepare_store` decided: the hashes to copy out, into which host blocks, and the
    hashes evicted to make room (their host blocks are reused by this store)."""

    hashes: list[Hashable]
    host_blocks: list[int]
    evicted: list[Hashable] = field(default_factory=list)


class HostBlockIndex:
    """Prefix hash -> host block, for `capacity` host blocks, least recently used first out."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a host KV pool needs at least one block, got {capacity}")
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.stats = OffloadStats()

    def __contains__(self, h: Hashable) -> bool:
        entry = self._entries.get(h)
        return entry is not None and entry.ready

    @property
    def used_blocks(self) -> int:
        return self.capacity - len(self._free)

    def lookup(self, hashes: Sequence[Hashable]) -> int:
        """How many leading blocks of a prefix are stored and ready to load (marks them used)."""
        self.stats.lookups += 1
        hits = 0
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None or not entry.ready:
                break
            self._entries.move_to_end(h)
            hits += 1
        self.stats.hits += hits
        self.stats.misses += len(hashes) - hits
        return hits

    def touch(self, hashes: Sequence[Hashable]) -> None:
        for h in hashes:
            if h in self._entries:
                self._entries.move_to_end(h)

    def prepare_load(self, hashes: Sequence[Hashable]) -> list[int]:
        """Host blocks of `hashes`, pinned against eviction until `complete_load`."""
        entries = []
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None or not entry.ready:
                raise KeyError(f"block {h!r} is not on the host (evicted, or its store is running)")
            entries.append(entry)
        for entry in entries:
            entry.readers += 1
        self.stats.loaded_blocks += len(entries)
        return [e.block for e in entries]

    def complete_load(self, hashes: Sequence[Hashable]) -> None:
        for h in hashes:
            entry = self._entries.get(h)
            if entry is not None and entry.readers > 0:
                entry.readers -= 1

    def prepare_store(self, hashes: Sequence[Hashable]) -> StorePlan:
        """Reserve host blocks for the hashes not stored yet (LRU entries make room); hashes that
        find no free or evictable block are skipped and counted as rejected."""
        plan = StorePlan([], [])
        for h in hashes:
            if h in self._entries:
                self._entries.move_to_end(h)
                continue
            block = self._take_block(plan.evicted)
            if block is None:
                self.stats.rejected_blocks += 1
                continue
            self._entries[h] = _Entry(block)
            plan.hashes.append(h)
            plan.host_blocks.append(block)
        self.stats.stored_blocks += len(plan.hashes)
        return plan

    def complete_store(self, hashes: Sequence[Hashable], success: bool = True) -> None:
        """Make stored blocks loadable, or give their host blocks back when the copy failed."""
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None or entry.ready:
                continue
            if success:
                entry.ready = True
            else:
                del self._entries[h]
                self._free.append(entry.block)
                self.stats.failed_blocks += 1

    def _take_block(self, evicted: list[Hashable]) -> int | None:
        if self._free:
            return self._free.pop()
        for h, entry in self._entries.items():  # least recently used first
            if entry.ready and entry.readers == 0:
                del self._entries[h]
                self.stats.evicted_blocks += 1
                evicted.append(h)
                return entry.block
        return None
