"""KV offload to a pinned host pool, bound to the `OffloadingSpec` interface of vLLM's 0.2x line
(`vllm.v1.kv_offload.abstract`, as vllm-ascend v0.23 runs it). `vllm_offload` picks this module
or `vllm_offload_032` by the installed vLLM.

Load it out of tree::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"spec_name": "AscendOffloadingSpec",
            "spec_module_path": "ascend_runtime.kv.vllm_offload",
            "cpu_bytes_to_use": 68719476736, "kv_layout": "cross_layer"}}'

The scheduler-side manager is `index.HostBlockIndex` (LRU by prefix hash, blocks invisible
while stored and pinned while loaded); the worker-side handlers copy with
`offload.BlockCopier` between the engine's caches and a host pool in the configured layout
(cross-layer by default: one contiguous host segment per block). Offloaded blocks are the
engine's blocks (no block-size multiple). This module imports vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from vllm.v1.kv_offload.abstract import (
    LoadStoreSpec,
    OffloadingEvent,
    OffloadingManager,
    PrepareStoreOutput,
)
from vllm.v1.kv_offload.mediums import CPULoadStoreSpec, GPULoadStoreSpec
from vllm.v1.kv_offload.spec import OffloadingSpec
from vllm.v1.kv_offload.worker.worker import OffloadingHandler, TransferResult

from .connector.caches import DeviceKv, HostStage, describe_caches
from .connector.settings import offload_host_blocks
from .index import HostBlockIndex
from .layout import LAYOUTS
from .offload import BlockCopier, CopyJobs


class HostIndexManager(OffloadingManager):
    """vLLM's scheduler-side offloading manager over a `HostBlockIndex`."""

    def __init__(self, index: HostBlockIndex, block_size: int):
        self.index, self.block_size = index, block_size
        self._events: list[OffloadingEvent] = []

    def lookup(self, block_hashes: Iterable[Any]) -> int:
        return self.index.lookup(list(block_hashes))

    def prepare_load(self, block_hashes: Iterable[Any]) -> LoadStoreSpec:
        return CPULoadStoreSpec(self.index.prepare_load(list(block_hashes)))

    def touch(self, block_hashes: Iterable[Any]) -> None:
        self.index.touch(list(block_hashes))

    def complete_load(self, block_hashes: Iterable[Any]) -> None:
        self.index.complete_load(list(block_hashes))

    def prepare_store(self, block_hashes: Iterable[Any]) -> PrepareStoreOutput | None:
        hashes = list(block_hashes)
        plan = self.index.prepare_store(hashes)
        if not plan.hashes and any(h not in self.index for h in hashes):
            return None  # every host block is busy being stored or loaded
        if plan.evicted:
            self._events.append(OffloadingEvent(plan.evicted, self.block_size, "CPU", True))
        return PrepareStoreOutput(
            block_hashes_to_store=plan.hashes,
            store_spec=CPULoadStoreSpec(plan.host_blocks),
            block_hashes_evicted=plan.evicted,
        )

    def complete_store(self, block_hashes: Iterable[Any], success: bool = True) -> None:
        hashes = list(block_hashes)
        self.index.complete_store(hashes, success)
        if success and hashes:
            self._events.append(OffloadingEvent(hashes, self.block_size, "CPU", False))

    def take_events(self) -> Iterable[OffloadingEvent]:
        events, self._events = self._events, []
        yield from events


class HostCopyHandler(OffloadingHandler):
    """vLLM's worker-side handler for one direction: device <-> host block copies."""

    def __init__(self, jobs: CopyJobs, to_host: bool):
        self.jobs, self.to_host = jobs, to_host

    def transfer_async(self, job_id: int, spec: Any) -> bool:
        src, dst = spec
        self.jobs.submit(job_id, self.to_host, src.block_ids, dst.block_ids)
        return True

    def get_finished(self) -> list[TransferResult]:
        return [TransferResult(j, True, size) for j, size in self.jobs.finished()]

    def wait(self, job_ids: set[int]) -> None:
        self.jobs.wait(job_ids)


class AscendOffloadingSpec(OffloadingSpec):
    """Host-memory KV offload through ascend-serve's pool (see the module docstring)."""

    def __init__(self, vllm_config: Any, kv_cache_config: Any = None):
        super().__init__(vllm_config, kv_cache_config)
        extra = dict(self.extra_config or {})
        self.layout = str(extra.get("kv_layout", "cross_layer"))
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"kv_connector_extra_config.kv_layout {self.layout!r} is not one of "
                f"{', '.join(LAYOUTS)}"
            )
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) != 1:
            raise ValueError(
                f"AscendOffloadingSpec supports models with one KV cache group, got {len(groups)}"
            )
        gpu = self.gpu_block_size
        sizes = gpu if isinstance(gpu, tuple) else (gpu,)
        if self.offloaded_block_size != sizes[0]:
            raise ValueError(
                f"kv_connector_extra_config.block_size {self.offloaded_block_size} must equal "
                f"the engine's block size {sizes[0]} (host blocks mirror engine blocks)"
            )
        self.block_size = sizes[0]
        group = groups[0]
        self.block_bytes = group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        world = vllm_config.parallel_config.world_size
        self.host_blocks = offload_host_blocks(extra, self.block_bytes, world)
        self._manager: HostIndexManager | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            self._manager = HostIndexManager(HostBlockIndex(self.host_blocks), self.block_size)
        return self._manager

    def get_handlers(
        self, kv_caches: Any, attn_backends: Any = None
    ) -> Iterator[tuple[type[LoadStoreSpec], type[LoadStoreSpec], OffloadingHandler]]:
        copier, block_bytes = self._copier(kv_caches)
        stores, loads = CopyJobs(copier, block_bytes), CopyJobs(copier, block_bytes)
        yield GPULoadStoreSpec, CPULoadStoreSpec, HostCopyHandler(stores, True)
        yield CPULoadStoreSpec, GPULoadStoreSpec, HostCopyHandler(loads, False)

    def _copier(self, kv_caches: Any) -> tuple[BlockCopier, int]:
        tensors = getattr(kv_caches, "tensors", None)
        if tensors is not None:  # canonical caches: opaque (blocks, page) tensors
            import torch

            device = [[t.tensor] for t in tensors]
            host = []
            for (t,) in device:
                buf = torch.zeros((self.host_blocks, *t.shape[1:]), dtype=t.dtype)
                host.append([buf.pin_memory() if t.device.type != "cpu" else buf])
            per_block = sum(t.tensor[0].numel() * t.tensor.element_size() for t in tensors)
            return BlockCopier(device, host), per_block
        device_kv: DeviceKv = describe_caches(kv_caches)
        stage = HostStage(device_kv, self.layout, self.host_blocks)
        return stage.copier, device_kv.spec.block_bytes()
