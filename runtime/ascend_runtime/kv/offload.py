"""KV offload: a byte-bounded host block pool, LRU by prefix hash, with asynchronous copies.

The pool mirrors the device cache's layout (same block contents, fewer or more blocks) in
pinned host memory. `store` copies device blocks out on a side stream and `load` copies them
back; each returns a `Transfer` whose event orders it against the compute stream. An entry is
visible to `lookup` only once its store finished, and is never evicted while a load reads it.

Copies go through `ascend_kernels.block_copy`: one kernel launch over every block on CUDA with a
pinned pool, else one DMA copy per run of consecutive blocks per contiguous segment (one
segment per block when cross-layer, one per layer when per-layer: the gap `bench/kv.py` shows).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from ascend_kernels.block_copy import copy_block_runs, copy_blocks_layers

from .layout import KvBuffers, KvLayout, allocate

Method = Literal["auto", "kernel", "dma"]


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
    bytes_to_host: int = 0
    bytes_to_device: int = 0


@dataclass
class _Entry:
    block: int
    ready: bool = False
    readers: int = 0


@dataclass
class Transfer:
    """An in-flight store or load; `done()` polls, `wait()` orders the current stream after it."""

    kind: Literal["store", "load"]
    hashes: list[Hashable]
    event: Any | None
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.event is not None:
            self.event.wait()  # the current stream waits; the host does not block


class HostKvPool:
    """Host copy of KV blocks, keyed by prefix hash, at most `capacity_bytes` large."""

    def __init__(
        self,
        device: KvBuffers,
        capacity_bytes: int,
        *,
        pin: bool | None = None,
        method: Method = "auto",
    ):
        spec = device.layout.spec
        per_block = spec.block_bytes()
        blocks = capacity_bytes // per_block
        if blocks < 1:
            raise ValueError(
                f"KV offload capacity {capacity_bytes} bytes is smaller than one block "
                f"({per_block} bytes over {spec.num_layers} layers): raise cpu_bytes_to_use "
                "(spec.runtime.kvOffload)"
            )
        self.device = device
        dev = device.k_raw.device
        pin = dev.type != "cpu" if pin is None else pin
        layout = KvLayout(replace(spec, num_blocks=blocks), device.layout.name)
        self.host = allocate(layout, device.k_raw.dtype, "cpu", pin=pin)
        self.capacity_blocks = blocks
        self.block_bytes = per_block
        self.method = method
        self._free = list(range(blocks - 1, -1, -1))
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._pending: list[Transfer] = []
        self.stats = OffloadStats()
        self._stream = _side_stream(dev)

    # ------------------------------------------------------------------ scheduler side

    def lookup(self, hashes: Sequence[Hashable]) -> int:
        """How many leading blocks of a prefix are on the host and ready to load."""
        self.poll()
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

    @property
    def used_blocks(self) -> int:
        return self.capacity_blocks - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_bytes

    # ------------------------------------------------------------------ worker side

    def store(self, hashes: Sequence[Hashable], device_blocks: Sequence[int]) -> Transfer:
        """Copy device blocks whose hashes are not yet on the host; LRU entries make room."""
        if len(hashes) != len(device_blocks):
            raise ValueError(f"{len(hashes)} hashes for {len(device_blocks)} device blocks")
        self.poll()
        todo: list[tuple[Hashable, int, int]] = []
        for h, d in zip(hashes, device_blocks, strict=True):
            if h in self._entries:
                self._entries.move_to_end(h)
                continue
            host = self._take_block()
            if host is None:
                self.stats.rejected_blocks += 1
                continue
            self._entries[h] = _Entry(host)
            todo.append((h, d, host))
        transfer = Transfer("store", [h for h, _, _ in todo], None)
        if todo:
            transfer.event = self._copy(
                self.device, self.host, [d for _, d, _ in todo], [h for _, _, h in todo]
            )
            self.stats.stored_blocks += len(todo)
            self.stats.bytes_to_host += len(todo) * self.block_bytes
        self._track(transfer)
        return transfer

    def load(self, hashes: Sequence[Hashable], device_blocks: Sequence[int]) -> Transfer:
        """Copy host blocks back into `device_blocks`; every hash must be ready (see lookup)."""
        if len(hashes) != len(device_blocks):
            raise ValueError(f"{len(hashes)} hashes for {len(device_blocks)} device blocks")
        self.poll()
        entries = []
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None or not entry.ready:
                raise KeyError(f"block {h!r} is not on the host (evicted, or its store is running)")
            entries.append(entry)
        for entry in entries:
            entry.readers += 1
        event = self._copy(self.host, self.device, [e.block for e in entries], list(device_blocks))
        transfer = Transfer("load", list(hashes), event)
        self.stats.loaded_blocks += len(entries)
        self.stats.bytes_to_device += len(entries) * self.block_bytes
        self._track(transfer)
        return transfer

    def poll(self) -> list[Transfer]:
        """Finish transfers whose copies completed: stored blocks become visible, loaded ones
        evictable again."""
        finished = [t for t in self._pending if t.done()]
        self._pending = [t for t in self._pending if not t.finished and t not in finished]
        for t in finished:
            self._finish(t)
        return finished

    def drain(self) -> None:
        """Block until every pending transfer finished (shutdown, tests)."""
        for t in self._pending:
            if t.event is not None:
                t.event.synchronize()
        self.poll()

    # ------------------------------------------------------------------ internals

    def _track(self, transfer: Transfer) -> None:
        if transfer.done():
            self._finish(transfer)
        else:
            self._pending.append(transfer)

    def _finish(self, transfer: Transfer) -> None:
        if transfer.finished:
            return
        transfer.finished = True
        for h in transfer.hashes:
            entry = self._entries.get(h)
            if entry is None:
                continue
            if transfer.kind == "store":
                entry.ready = True
            else:
                entry.readers -= 1

    def _take_block(self) -> int | None:
        if self._free:
            return self._free.pop()
        for h, entry in self._entries.items():  # least recently used first
            if entry.ready and entry.readers == 0:
                del self._entries[h]
                self.stats.evicted_blocks += 1
                return entry.block
        return None

    def _copy(self, src: KvBuffers, dst: KvBuffers, src_ids: list[int], dst_ids: list[int]) -> Any:
        s = torch.tensor(src_ids, dtype=torch.int64)
        d = torch.tensor(dst_ids, dtype=torch.int64)
        stream = self._stream
        if stream is None:
            _copy_all(src, dst, s, d, self.method)
            return None
        module = torch.get_device_module(self.device.k_raw.device)
        stream.wait_stream(module.current_stream())  # the KV being stored was written first
        with module.stream(stream):
            _copy_all(src, dst, s, d, self.method)
            event = module.Event()
            event.record(stream)
        return event


def _copy_all(
    src: KvBuffers, dst: KvBuffers, s: torch.Tensor, d: torch.Tensor, method: Method
) -> None:
    for which in ("k", "v"):
        srcs, dsts = src.block_tensors(which), dst.block_tensors(which)
        if method == "dma":
            for a, b in zip(srcs, dsts, strict=True):
                copy_block_runs(a, b, s, d)
        else:
            copy_blocks_layers(srcs, dsts, s, d)


def _side_stream(device: torch.device) -> Any | None:
    if device.type == "cpu":
        return None
    return torch.get_device_module(device).Stream(device=device)
