"""Stand-in for vLLM's block-id load/store specs."""

from .abstract import LoadStoreSpec


class BlockIDsLoadStoreSpec(LoadStoreSpec):
    def __init__(self, block_ids: list[int]):
        self.block_ids = list(block_ids)


class GPULoadStoreSpec(BlockIDsLoadStoreSpec):
    @staticmethod
    def medium() -> str:
        return "GPU"


class CPULoadStoreSpec(BlockIDsLoadStoreSpec):
    @staticmethod
    def medium() -> str:
        return "CPU"
