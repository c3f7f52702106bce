"""The sim engine's KV blocks with automatic prefix caching, shaped as vLLM's block pool:
full blocks are keyed by their chain hash (kv.block_hash), a new request takes the longest
run of cached blocks that matches its prefix, blocks are shared by reference count, and a
block whose count drops to zero stays cached in a free queue until it is the least recently
used one and is handed out again (then its hash is evicted). Every change to what is cached
is reported as vLLM's KV events (BlockStored, BlockRemoved, AllBlocksCleared) to listeners.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..kv.block_hash import ROOT_HASH, hash_block
from ..kv.cache_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from . import model

if TYPE_CHECKING:
    from . import engine


class BlockPool:
    """Fixed number of KV blocks; ids handed out and returned."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class PrefixCachePool(BlockPool):
    """`num_blocks` KV blocks of `block_size` tokens, with prefix caching."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # type: ignore[assignment]
        """Blocks nobody references, least recently used first (the next to be handed out)."""
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        self.listeners: list[Callable[[KvEvent], None]] = []
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def cached_blocks(self) -> int:
        return len(self._block_of)

    def match(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (nothing is taken yet)."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def free_among(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` sit in the free queue (taking them leaves fewer to allocate)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take(self, blocks: Sequence[int]) -> None:
        """Reference cached blocks a request reuses."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks from the head of the free queue, evicting what they cached; None when
        fewer are free."""
        if n > len(self._free):
            return None
        blocks, evicted = [], []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash_of.pop(b, None)
            if h is not None:
                del self._block_of[h]
                evicted.append(h)
            self._refs[b] = 1
            blocks.append(b)
        if evicted:
            self._publish(BlockRemoved(evicted))
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block; unreferenced ones join the free queue, a
        sequence's last block first, so its tail is evicted before its head (as vLLM does)."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None

    def store(
        self, blocks: Sequence[int], hashes: Sequence[int], parent: int | None,
        tokens: Callable[[int], list[int]],
    ) -> None:  # fmt: skip
        """Cache consecutive full blocks of one sequence under their hashes (`parent`: the
        hash before the first; a hash cached already keeps its block). `tokens(i)` gives the
        i-th block's token ids, asked only when somebody listens."""
        run: list[int] = []
        for i, (b, h) in enumerate(zip(blocks, hashes, strict=True)):
            if h in self._block_of or b in self._hash_of:
                self._stored(run, parent, tokens, i)
                run, parent = [], h
                continue
            self._block_of[h] = b
            self._hash_of[b] = h
            run.append(h)
        self._stored(run, parent, tokens, len(hashes))

    def _stored(
        self, run: list[int], parent: int | None, tokens: Callable[[int], list[int]], end: int
    ) -> None:
        if run and self.listeners:
            ids = [t for i in range(end - len(run), end) for t in tokens(i)]
            self._publish(BlockStored(run, parent, ids, self.block_size))

    # ------------------------------------------------------------------ one sequence

    def lookup(self, seq: engine.Sequence) -> list[int]:
        """Cached blocks matching a waiting sequence's prefix, not taken yet. The last token
        is always computed (it samples the next one), as vLLM caps a hit."""
        limit = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, limit)
        return self.match(seq.block_hashes[:limit])

    def reuse(self, seq: engine.Sequence, hit: list[int], imported: bool = False) -> None:
        """Admit a sequence on its cached prefix (possibly empty; the lookup is counted):
        those tokens cost no compute (`imported`: its KV is there already, only the blocks
        are shared)."""
        self.queried_tokens += seq.num_tokens
        self.hit_tokens += len(hit) * self.block_size
        if not hit:
            return
        self.take(hit)
        seq.blocks = list(hit)
        seq.stored_blocks = len(hit)
        if imported:
            return
        seq.computed = len(hit) * self.block_size
        if not seq.timing_only:  # the model's states are a function of the tokens alone
            state = model.initial_state(seq.seed)
            for token in seq.token_range(0, seq.computed):
                state = model.advance(state, token)
                seq.states.append(state)

    def store_filled(self, seq: engine.Sequence) -> None:
        """Offer the sequence's newly filled blocks to the cache."""
        bs = self.block_size
        # A sampled token has no KV until the next step feeds it back.
        kv = min(seq.computed, seq.num_tokens - 1) if seq.output else seq.computed
        full = min(kv, len(seq.blocks) * bs) // bs
        first = seq.stored_blocks
        if full <= first:
            return
        self._extend_hashes(seq, full)
        parent = seq.block_hashes[first - 1] if first else None
        self.store(
            seq.blocks[first:full], seq.block_hashes[first:full], parent,
            lambda i: seq.token_range((first + i) * bs, (first + i + 1) * bs),
        )  # fmt: skip
        seq.stored_blocks = full

    def _extend_hashes(self, seq: engine.Sequence, full: int) -> None:
        bs, hashes = self.block_size, seq.block_hashes
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), full):
            parent = hash_block(parent, seq.token_range(i * bs, (i + 1) * bs))
            hashes.append(parent)

    def clear(self) -> bool:
        """Forget every cached hash (vLLM's reset_prefix_cache); refused (False) while any
        block is referenced."""
        if self.used:
            return False
        self._hash_of.clear()
        self._block_of.clear()
        self._publish(AllBlocksCleared())
        return True

    def _publish(self, event: KvEvent) -> None:
        for listener in self.listeners:
            listener(event)
