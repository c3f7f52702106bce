"""What a prefix cache reports about its blocks, as vLLM's KV events name it: blocks stored
under their chain hashes (kv.block_hash), blocks evicted, everything cleared. The sim engine
produces them, kv.events carries them over ZMQ, the router's prefix index consumes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStored:
    """Blocks that became cached, in chain order, with the parent of the first."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[int]


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared
