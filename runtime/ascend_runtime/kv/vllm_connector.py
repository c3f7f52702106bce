"""ascend-serve's prefill->decode KV connector, bound to vLLM's `KVConnectorBase_V1`.

Load it out of tree (no vLLM patch)::

    --kv-transfer-config '{"kv_connector": "AscendKvConnector",
        "kv_connector_module_path": "ascend_runtime.kv.vllm_connector",
        "kv_role": "kv_producer", "kv_port": 36000, "engine_id": "prefill-0",
        "kv_connector_extra_config": {"kv_layout": "cross_layer", "timeout": 120}}'

This module only translates: vLLM's requests, block tables and scheduler output become plain
values for `connector.scheduler.PdScheduler`, and the worker calls go to
`connector.worker.PdWorker`. It imports vLLM, so only engine processes import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .connector.caches import cross_layer_caches, describe_caches, describe_pages
from .connector.scheduler import PdMeta, PdScheduler, wants_remote_decode
from .connector.settings import engine_page_layout, from_vllm_config
from .connector.worker import PdWorker

if TYPE_CHECKING:
    import torch


class AscendKvMeta(KVConnectorMetadata):
    """One step's `PdMeta`, carried from the scheduler to every worker."""

    def __init__(self, meta: PdMeta):
        self.meta = meta


def _first_group(block_ids: Any) -> list[int]:
    """vLLM passes block ids per KV-cache group; uniform models have one group."""
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids or [])


def _local_rank() -> int:
    """This worker's flat rank in the instance: pcp_rank * TP + tp_rank."""
    from vllm.distributed import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    get_pcp = getattr(ps, "get_pcp_group", None)
    pcp_rank = get_pcp().rank_in_group if get_pcp is not None else 0
    return pcp_rank * tp + tp_rank


class AscendKvConnector(KVConnectorBase_V1):
    """Prefill->decode KV hand-off over ascend-serve's transports (TCP built in)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        num_blocks = getattr(kv_cache_config, "num_blocks", None) or getattr(
            vllm_config.cache_config, "num_gpu_blocks", None
        )
        if not num_blocks:
            raise ValueError("AscendKvConnector needs the KV cache's number of blocks")
        self.settings = from_vllm_config(vllm_config, num_blocks)
        self._scheduler = PdScheduler(self.settings) if role == KVConnectorRole.SCHEDULER else None
        self._worker: PdWorker | None = None
        self._requests: dict[str, Any] = {}
        self._tables: dict[str, list[int]] = {}

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        return self.settings.layout.startswith("cross_layer")

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.matched_tokens(
            request.kv_transfer_params, request.num_prompt_tokens, num_computed_tokens
        )

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        assert self._scheduler is not None
        block_ids = _first_group(blocks.get_block_ids())
        if wants_remote_decode(request.kv_transfer_params):
            self._requests[request.request_id] = request
        self._scheduler.after_alloc(
            request.request_id,
            request.kv_transfer_params,
            block_ids,
            num_external_tokens,
            request.num_prompt_tokens,
        )

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._requests:
                self._tables[new.req_id] = _first_group(new.block_ids)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(getattr(cached, "req_ids", [])):
            if req_id in self._requests and cached.new_block_ids[i] is not None:
                self._tables.setdefault(req_id, []).extend(_first_group(cached.new_block_ids[i]))
        for req_id, count in scheduler_output.num_scheduled_tokens.items():
            request = self._requests.get(req_id)
            if request is None:
                continue
            self._scheduler.scheduled(
                req_id,
                request.kv_transfer_params,
                self._tables.get(req_id, []),
                request.num_prompt_tokens,
                request.num_computed_tokens + count,
            )
        return AscendKvMeta(self._scheduler.build_meta())

    def update_connector_output(self, connector_output: Any):
        assert self._scheduler is not None
        for req_id in getattr(connector_output, "finished_recving", None) or ():
            self._scheduler.load_finished(req_id)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        assert self._scheduler is not None
        self._requests.pop(request.request_id, None)
        self._tables.pop(request.request_id, None)
        return self._scheduler.finished(
            request.request_id,
            request.kv_transfer_params,
            _first_group(block_ids),
            request.status.name == "FINISHED_LENGTH_CAPPED",
            request.num_prompt_tokens,
        )

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        page_layout = engine_page_layout(self._vllm_config)
        if page_layout is not None:  # vLLM 0.3x: page views in the layout vLLM resolved
            device = describe_pages(kv_caches, page_layout)
        else:
            device = describe_caches(kv_caches)
        self._worker = PdWorker(self.settings, _local_rank(), device)

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: Any):
        """vLLM lines that allocate one cross-layer tensor when a connector prefers it."""
        self._worker = PdWorker(
            self.settings, _local_rank(), describe_caches(cross_layer_caches(kv_cache))
        )

    def _meta(self) -> PdMeta:
        meta = self._get_connector_metadata()
        assert isinstance(meta, AscendKvMeta)
        return meta.meta

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None, "register_kv_caches was not called"
        self._worker.start(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # whole-request loads finish before the request is scheduled

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved once per step, in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        sent, received = self._worker.finished(finished_req_ids)
        return sent or None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_errors() if self._worker else set()

    def shutdown(self):
        if self._worker is not None:
            self._worker.close()
            self._worker = None
