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

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from ascend_kernels.block_copy import copy_block_runs, copy_blocks_layers

from .index import HostBlockIndex, OffloadStats
from .layout import KvBuffers, KvLayout, allocate

Method = Literal["auto", "kernel", "dma"]
__all__ = ["HostKvPool", "OffloadStats", "Transfer", "copy_kv_blocks"]


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
        self.index = HostBlockIndex(blocks)
        self.stats: OffloadStats = self.index.stats
        self._pending: list[Transfer] = []
        self.copier = BlockCopier(_groups(device), _groups(self.host), method)

    # ------------------------------------------------------------------ scheduler side

    def lookup(self, hashes: Sequence[Hashable]) -> int:
        """How many leading blocks of a prefix are on the host and ready to load."""
        self.poll()
        return self.index.lookup(hashes)

    @property
    def used_blocks(self) -> int:
        return self.index.used_blocks

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_bytes

    # ------------------------------------------------------------------ worker side

    def store(self, hashes: Sequence[Hashable], device_blocks: Sequence[int]) -> Transfer:
        """Copy device blocks whose hashes are not yet on the host; LRU entries make room."""
        if len(hashes) != len(device_blocks):
            raise ValueError(f"{len(hashes)} hashes for {len(device_blocks)} device blocks")
        self.poll()
        where = dict(zip(hashes, device_blocks, strict=True))
        plan = self.index.prepare_store(list(hashes))
        transfer = Transfer("store", plan.hashes, None)
        if plan.hashes:
            transfer.event = self.copier.copy(
                True, [where[h] for h in plan.hashes], plan.host_blocks
            )
            self.stats.bytes_to_host += len(plan.hashes) * self.block_bytes
        self._track(transfer)
        return transfer

    def load(self, hashes: Sequence[Hashable], device_blocks: Sequence[int]) -> Transfer:
        """Copy host blocks back into `device_blocks`; every hash must be ready (see lookup)."""
        if len(hashes) != len(device_blocks):
            raise ValueError(f"{len(hashes)} hashes for {len(device_blocks)} device blocks")
        self.poll()
        host_blocks = self.index.prepare_load(list(hashes))
        event = self.copier.copy(False, host_blocks, list(device_blocks))
        transfer = Transfer("load", list(hashes), event)
        self.stats.bytes_to_device += len(host_blocks) * self.block_bytes
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
        if transfer.kind == "store":
            self.index.complete_store(transfer.hashes)
        else:
            self.index.complete_load(transfer.hashes)


class BlockCopier:
    """Asynchronous block copies between a device side and a host side, each a list of cache
    groups (K caches, V caches) that pair up tensor for tensor. Copies run on a side stream
    after the compute stream's work so far; `copy` returns the event that marks their end
    (None when everything is on the host and the copy already happened)."""

    def __init__(
        self,
        device: list[list[torch.Tensor]],
        host: list[list[torch.Tensor]],
        method: Method = "auto",
    ):
        if len(device) != len(host) or any(
            len(d) != len(h) for d, h in zip(device, host, strict=True)
        ):
            raise ValueError("device and host cache groups must pair up tensor for tensor")
        self.device, self.host, self.method = device, host, method
        first = next(t for group in device for t in group)
        self._dev = first.device
        self._stream = _side_stream(first.device)

    def copy(self, to_host: bool, src_ids: Sequence[int], dst_ids: Sequence[int]) -> Any:
        s = torch.tensor(list(src_ids), dtype=torch.int64)
        d = torch.tensor(list(dst_ids), dtype=torch.int64)
        src, dst = (self.device, self.host) if to_host else (self.host, self.device)
        if self._stream is None:
            _copy_groups(src, dst, s, d, self.method)
            return None
        module = torch.get_device_module(self._dev)
        self._stream.wait_stream(module.current_stream())  # the KV being copied was written
        with module.stream(self._stream):
            _copy_groups(src, dst, s, d, self.method)
            event = module.Event()
            event.record(self._stream)
        return event


def _copy_groups(
    src: list[list[torch.Tensor]],
    dst: list[list[torch.Tensor]],
    s: torch.Tensor,
    d: torch.Tensor,
    method: Method,
) -> None:
    for srcs, dsts in zip(src, dst, strict=True):
        if not srcs:
            continue
        if method == "dma":
            for a, b in zip(srcs, dsts, strict=True):
                copy_block_runs(a, b, s, d)
        else:
            copy_blocks_layers(srcs, dsts, s, d)


def copy_kv_blocks(
    src: KvBuffers, dst: KvBuffers, s: torch.Tensor, d: torch.Tensor, method: Method = "auto"
) -> None:
    """Copy blocks `s` of `src` to blocks `d` of `dst` (K and V; same layout, any devices)."""
    _copy_groups(_groups(src), _groups(dst), s, d, method)


def _groups(buffers: KvBuffers) -> list[list[torch.Tensor]]:
    return [buffers.block_tensors("k"), buffers.block_tensors("v")]


def _side_stream(device: torch.device) -> Any | None:
    if device.type == "cpu":
        return None
    return torch.get_device_module(device).Stream(device=device)


class CopyJobs:
    """Block copies in flight, by job id: what vLLM's offloading workers (every line) report as
    finished, with the bytes each moved, and wait for."""

    def __init__(self, copier: BlockCopier, block_bytes: int):
        self.copier, self.block_bytes = copier, block_bytes
        self._jobs: dict[int, tuple[Any, int]] = {}

    def submit(self, job_id: int, to_host: bool, src: Sequence[int], dst: Sequence[int]) -> None:
        """Start copying blocks `src` to `dst` (device to host when `to_host`)."""
        src_ids, dst_ids = [int(b) for b in src], [int(b) for b in dst]
        if len(src_ids) != len(dst_ids):
            raise ValueError(
                f"offload job {job_id} pairs {len(src_ids)} source blocks with {len(dst_ids)} "
                "destination blocks: host blocks must mirror engine blocks"
            )
        event = self.copier.copy(to_host, src_ids, dst_ids)
        self._jobs[job_id] = (event, len(src_ids) * self.block_bytes)

    def finished(self) -> list[tuple[int, int]]:
        """(job id, bytes) of the jobs whose copies completed since the last call."""
        done = [j for j, (event, _) in self._jobs.items() if event is None or event.query()]
        return [(j, self._jobs.pop(j)[1]) for j in done]

    def wait(self, job_ids: set[int]) -> None:
        for j in job_ids:
            event = self._jobs.get(j, (None, 0))[0]
            if event is not None:
                event.synchronize()
