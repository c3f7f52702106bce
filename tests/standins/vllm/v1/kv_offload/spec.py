"""Stand-in for vLLM's OffloadingSpec base: what its constructor derives from the config."""

from abc import ABC, abstractmethod
from typing import Any


class OffloadingSpec(ABC):
    def __init__(self, vllm_config: Any, kv_cache_config: Any):
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.extra_config = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.gpu_block_size = tuple(
            g.kv_cache_spec.block_size for g in kv_cache_config.kv_cache_groups
        )
        self.offloaded_block_size = int(
            self.extra_config.get("block_size", max(self.gpu_block_size))
        )

    @abstractmethod
    def get_manager(self) -> Any: ...

    @abstractmethod
    def get_handlers(self, kv_caches: Any) -> Any: ...
