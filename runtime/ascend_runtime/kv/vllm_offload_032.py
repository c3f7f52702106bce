"""`AscendOffloadingSpec` for vLLM 0.3x's offloading interface (`vllm.v1.kv_offload.base`).

vLLM hands the worker canonical caches: per layer (or per packed group of layers) a
(blocks, page bytes) tensor, K and V inside each page as the attention backend packs them. The
host pool keeps whole pages, in the configured layout: `cross_layer` puts every layer's page of
a block side by side (one host segment per block), `per_layer` keeps one host tensor per
layer. The scheduler side is `index.HostBlockIndex` behind vLLM's per-key manager calls.
Host blocks mirror engine blocks (one engine block per offloaded chunk).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadingManager,
    OffloadingSpec,
    OffloadingWorker,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .connector.settings import offload_host_blocks
from .index import HostBlockIndex
from .offload import BlockCopier, CopyJobs

HOST_LAYOUTS = ("cross_layer", "per_layer")


class HostIndexManager(OffloadingManager):
    """The scheduler side: which engine-block keys the host pool holds, LRU, with events
    only when vLLM drains them (KV events on)."""

    def __init__(self, index: HostBlockIndex, events: bool):
        self.index, self.events = index, events
        self._events: list[OffloadingEvent] = []

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        # blocks being stored are not readable yet: a miss, so vLLM computes them
        return LookupResult.HIT if self.index.lookup([key]) else LookupResult.MISS

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        return CacheHitSource.HOST  # vLLM's prompt_tokens_cached_by_source{source="host"}

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        return CPULoadStoreSpec(self.index.prepare_load(list(keys)))

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.index.touch(list(keys))

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self.index.complete_load(list(keys))

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        wanted = list(keys)
        plan = self.index.prepare_store(wanted)
        if not plan.hashes and any(k not in self.index for k in wanted):
            return None  # every host block is busy being stored or loaded
        self._event(plan.evicted, removed=True)
        return PrepareStoreOutput(
            keys_to_store=list(plan.hashes),
            store_spec=CPULoadStoreSpec(plan.host_blocks),
            evicted_keys=list(plan.evicted),
        )

    def complete_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True
    ) -> None:
        stored = list(keys)
        self.index.complete_store(stored, success)
        if success:
            self._event(stored, removed=False)

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def take_events(self) -> Iterable[OffloadingEvent]:
        events, self._events = self._events, []
        yield from events

    def _event(self, keys: list[Any], removed: bool) -> None:
        if self.events and keys:
            self._events.append(OffloadingEvent(keys, Medium.CPU, removed))


class HostCopyWorker(OffloadingWorker):
    """The worker side: page copies between the engine's caches and the host pool."""

    def __init__(self, jobs: CopyJobs):
        self.jobs = jobs

    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        self.jobs.submit(job_id, True, src_spec.block_ids, dst_spec.block_ids)  # type: ignore[attr-defined]
        return True

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        self.jobs.submit(job_id, False, src_spec.block_ids, dst_spec.block_ids)  # type: ignore[attr-defined]
        return True

    def get_finished(self) -> list[TransferResult]:
        return [TransferResult(j, True, size) for j, size in self.jobs.finished()]

    def wait(self, job_ids: set[int]) -> None:
        self.jobs.wait(job_ids)


def host_pool(device: list[torch.Tensor], host_blocks: int, layout: str) -> list[torch.Tensor]:
    """Host tensors pairing the device page tensors, (host_blocks, page bytes) each: views of
    one (host_blocks, all pages) buffer when cross-layer, separate buffers when per-layer."""
    pin = device[0].device.type != "cpu"
    pages = [t.shape[1] for t in device]
    if layout == "per_layer":
        bufs = [torch.zeros((host_blocks, p), dtype=torch.int8) for p in pages]
        return [b.pin_memory() if pin else b for b in bufs]
    buf = torch.zeros((host_blocks, sum(pages)), dtype=torch.int8)
    buf = buf.pin_memory() if pin else buf
    views, offset = [], 0
    for p in pages:
        views.append(buf[:, offset : offset + p])
        offset += p
    return views


class AscendOffloadingSpec(OffloadingSpec):
    """Host-memory KV offload through ascend-serve's pool (see the module docstring)."""

    def __init__(self, config: Any):
        super().__init__(config)
        extra = dict(self.extra_config or {})
        self.layout = str(extra.get("kv_layout", "cross_layer")).removesuffix("_hnd")
        if self.layout not in HOST_LAYOUTS:
            raise ValueError(
                f"kv_connector_extra_config.kv_layout {extra.get('kv_layout')!r} is not one of "
                f"{', '.join(HOST_LAYOUTS)}"
            )
        if len(config.groups) != 1:
            raise ValueError(
                "AscendOffloadingSpec supports models with one KV cache group, got "
                f"{len(config.groups)}"
            )
        if config.cache.blocks_per_chunk != 1:
            raise ValueError(
                f"kv_connector_extra_config asks for {config.cache.blocks_per_chunk} engine "
                "blocks per offloaded chunk; AscendOffloadingSpec's host blocks mirror engine "
                "blocks: leave out block_size and blocks_per_chunk"
            )
        self.block_bytes = int(config.worker_kv_bytes_per_block)
        self.host_blocks = offload_host_blocks(extra, self.block_bytes, config.parallel.world_size)
        self._manager: HostIndexManager | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            events = self.kv_events_config.enable_kv_cache_events
            self._manager = HostIndexManager(HostBlockIndex(self.host_blocks), events)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        device = [t.tensor for t in kv_caches.tensors]
        if not device:
            raise ValueError("the engine registered no KV cache tensors to offload")
        host = host_pool(device, self.host_blocks, self.layout)
        block_bytes = sum(t.shape[1] for t in device)
        return HostCopyWorker(CopyJobs(BlockCopier([device], [host]), block_bytes))
