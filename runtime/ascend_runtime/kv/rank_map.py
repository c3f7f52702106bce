"""Which prefill ranks' KV each decode rank pulls, for any TP / PCP / DCP on either side.

Placement model (vLLM's, as vllm-ascend uses it):

- Heads: with TP >= the model's KV heads, TP rank r holds head r // (TP / heads) (consecutive
  ranks replicate a head); with fewer ranks than heads, rank r holds heads/TP consecutive heads.
  MLA has one latent "head" held by every TP rank.
- Tokens: the context-parallel group has PCP x DCP slots; rank (pcp_rank, tp_rank) is slot
  pcp_rank * DCP + tp_rank % DCP (DCP splits the ranks that replicate a head). Token t lives in
  slot (t // interleave) % slots, at local position (t // (interleave * slots)) * interleave
  + t % interleave of that rank, i.e. block local // block_size of the request's block table
  (shared by all ranks of an instance), offset local % block_size.

`plan_pulls` gives, per decode rank, chunks of (token run x head range) to copy from one
prefill rank's blocks to its own; together they deliver every (token, head) a decode rank holds
exactly once. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KvPlacement:
    """How one instance spreads a request's KV over its ranks."""

    tp: int
    kv_heads: int
    block_size: int
    pcp: int = 1
    dcp: int = 1
    interleave: int = 1
    mla: bool = False
    role: str = "instance"

    def __post_init__(self) -> None:
        where = self.role
        for name in ("tp", "kv_heads", "block_size", "pcp", "dcp", "interleave"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        if self.mla:
            if self.kv_heads != 1:
                raise ValueError(f"{where}: MLA caches one latent head, so kv_heads must be 1")
            if self.tp % self.dcp:
                raise ValueError(
                    f"{where}: with MLA, tensor parallel ({self.tp}) must be a multiple of "
                    f"decodeContext ({self.dcp})"
                )
        elif self.tp >= self.kv_heads:
            if self.tp % self.kv_heads:
                raise ValueError(
                    f"{where}: tensor parallel {self.tp} is not a multiple of the model's "
                    f"{self.kv_heads} KV heads"
                )
            if (self.tp // self.kv_heads) % self.dcp:
                raise ValueError(
                    f"{where}: decodeContext {self.dcp} must divide tensor/kv_heads = "
                    f"{self.tp // self.kv_heads} (DCP splits the ranks that replicate a head)"
                )
        else:
            if self.kv_heads % self.tp:
                raise ValueError(
                    f"{where}: the model's {self.kv_heads} KV heads do not split over tensor "
                    f"parallel {self.tp}"
                )
            if self.dcp > 1:
                raise ValueError(
                    f"{where}: decodeContext {self.dcp} needs tensor parallel >= "
                    f"{self.kv_heads * self.dcp} ({self.kv_heads} KV heads x DCP)"
                )

    @property
    def ranks(self) -> int:
        return self.tp * self.pcp

    @property
    def slots(self) -> int:
        return self.pcp * self.dcp

    @property
    def heads_per_rank(self) -> int:
        return 1 if self.mla or self.tp >= self.kv_heads else self.kv_heads // self.tp

    def rank(self, pcp_rank: int, tp_rank: int) -> int:
        return pcp_rank * self.tp + tp_rank

    def split(self, rank: int) -> tuple[int, int]:
        """(pcp_rank, tp_rank) of a flat rank index."""
        return divmod(rank, self.tp)

    def first_head(self, tp_rank: int) -> int:
        if self.mla:
            return 0
        if self.tp >= self.kv_heads:
            return tp_rank // (self.tp // self.kv_heads)
        return tp_rank * self.heads_per_rank

    def slot_of_rank(self, rank: int) -> int:
        pcp_rank, tp_rank = self.split(rank)
        return pcp_rank * self.dcp + tp_rank % self.dcp

    def slot_of_token(self, token: int) -> int:
        return (token // self.interleave) % self.slots

    def local_position(self, token: int) -> int:
        unit = self.interleave * self.slots
        return (token // unit) * self.interleave + token % self.interleave

    def tokens_of_slot(self, slot: int, num_tokens: int) -> int:
        """How many of a request's first `num_tokens` tokens live in `slot`."""
        full, rest = divmod(num_tokens, self.interleave * self.slots)
        return full * self.interleave + min(max(rest - slot * self.interleave, 0), self.interleave)

    def blocks_needed(self, num_tokens: int) -> int:
        """Length of the request's block table (the largest slot's share, in blocks)."""
        most = max(self.tokens_of_slot(s, num_tokens) for s in range(self.slots))
        return -(-most // self.block_size)

    def whole_block_tokens(self, num_tokens: int) -> int:
        """`num_tokens` rounded up so that every slot's share fills whole blocks, without
        lengthening the block table. Transfers move whole blocks: attention backends may tile
        or pack K and V inside a block (vLLM's CPU backend stores a head's keys, then its
        values), so the rows of a partial last block are not the first tokens' bytes."""
        if num_tokens <= 0:
            return num_tokens
        unit = self.block_size * (self.slots if self.interleave < self.block_size else 1)
        rounded = -(-num_tokens // unit) * unit
        whole = all(
            self.tokens_of_slot(s, rounded) % self.block_size == 0 for s in range(self.slots)
        )
        if whole and self.blocks_needed(rounded) == self.blocks_needed(num_tokens):
            return rounded
        return num_tokens

    def same_token_placement(self, other: KvPlacement) -> bool:
        """True when both instances put every token at the same block and offset."""
        return (self.block_size, self.pcp, self.dcp, self.interleave) == (
            other.block_size,
            other.pcp,
            other.dcp,
            other.interleave,
        )

    def holders(self, slot: int, head: int) -> list[int]:
        """Ranks holding (slot, head), lowest first."""
        return [
            r
            for r in range(self.ranks)
            if self.slot_of_rank(r) == slot
            and 0 <= head - self.first_head(self.split(r)[1]) < self.heads_per_rank
        ]


@dataclass(frozen=True)
class Chunk:
    """Copy `tokens` tokens x `heads` heads from a prefill rank's block to a decode rank's.

    Blocks are indices into each side's block table for the request; tokens are offsets in
    the block; heads are indices among the heads each rank holds."""

    decode_rank: int
    prefill_rank: int
    src_block: int
    src_token: int
    dst_block: int
    dst_token: int
    tokens: int
    src_head: int
    dst_head: int
    heads: int


def check_pair(prefill: KvPlacement, decode: KvPlacement) -> None:
    """Both instances must serve the same model cache."""
    if (prefill.kv_heads, prefill.mla) != (decode.kv_heads, decode.mla):
        raise ValueError(
            f"prefill caches {prefill.kv_heads} KV heads (mla={prefill.mla}) but decode caches "
            f"{decode.kv_heads} (mla={decode.mla}): both must serve the same model"
        )


def plan_pulls(prefill: KvPlacement, decode: KvPlacement, num_tokens: int) -> list[list[Chunk]]:
    """Per decode rank, the chunks it copies (merged where both sides are contiguous)."""
    check_pair(prefill, decode)
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return [_pulls_of(prefill, decode, r, num_tokens) for r in range(decode.ranks)]


def _head_pieces(prefill: KvPlacement, first: int, count: int) -> list[tuple[int, int]]:
    """Split heads [first, first+count) at the prefill side's shard boundaries."""
    step = prefill.heads_per_rank
    pieces, head = [], first
    while head < first + count:
        end = min(first + count, (head // step + 1) * step) if not prefill.mla else first + count
        pieces.append((head, end - head))
        head = end
    return pieces


def _pulls_of(prefill: KvPlacement, decode: KvPlacement, rank: int, num_tokens: int) -> list[Chunk]:
    _, tp_rank = decode.split(rank)
    slot = decode.slot_of_rank(rank)
    d_first = decode.first_head(tp_rank)
    pieces = _head_pieces(prefill, d_first, decode.heads_per_rank)
    chunks: list[Chunk] = []
    holders: dict[tuple[int, int], list[int]] = {}
    # With one slot the interleave splits nothing: walk whole runs, not interleave units
    # (per-token steps at interleave 1 cost ~70 ms of planning for a 1 GiB request).
    d_unit = decode.interleave if decode.slots > 1 else max(num_tokens, 1)
    p_unit = prefill.interleave if prefill.slots > 1 else max(num_tokens, 1)
    for start in range(slot * d_unit, num_tokens, d_unit * decode.slots):
        t, end = start, min(start + d_unit, num_tokens)
        while t < end:
            d_pos = decode.local_position(t)
            p_pos = prefill.local_position(t)
            n = min(
                end - t,
                p_unit - t % p_unit,
                decode.block_size - d_pos % decode.block_size,
                prefill.block_size - p_pos % prefill.block_size,
            )
            p_slot = prefill.slot_of_token(t)
            for head, count in pieces:
                if (p_slot, head) not in holders:
                    holders[p_slot, head] = prefill.holders(p_slot, head)
                replicas = holders[p_slot, head]
                src = replicas[rank % len(replicas)]  # spread decode ranks over replicas
                src_first = prefill.first_head(prefill.split(src)[1])
                _append(
                    chunks,
                    Chunk(
                        rank, src,
                        p_pos // prefill.block_size, p_pos % prefill.block_size,
                        d_pos // decode.block_size, d_pos % decode.block_size,
                        n, head - src_first, head - d_first, count,
                    ),
                )  # fmt: skip
            t += n
    return chunks


def _append(chunks: list[Chunk], c: Chunk) -> None:
    """Extend an earlier chunk when `c` continues it on both sides (same heads, same blocks)."""
    for i in range(len(chunks) - 1, max(len(chunks) - 8, -1), -1):
        p = chunks[i]
        if (
            (p.prefill_rank, p.src_block, p.dst_block, p.src_head, p.dst_head, p.heads)
            == (c.prefill_rank, c.src_block, c.dst_block, c.src_head, c.dst_head, c.heads)
            and p.src_token + p.tokens == c.src_token
            and p.dst_token + p.tokens == c.dst_token
        ):
            chunks[i] = Chunk(
                p.decode_rank, p.prefill_rank, p.src_block, p.src_token, p.dst_block,
                p.dst_token, p.tokens + c.tokens, p.src_head, p.dst_head, p.heads,
            )  # fmt: skip
            return
    chunks.append(c)


def sources(chunks: list[Chunk]) -> list[int]:
    """Prefill ranks a decode rank's chunks read from, in first-use order."""
    return list(dict.fromkeys(c.prefill_rank for c in chunks))


def prefill_endpoint(params: Mapping[str, Any], prefill: KvPlacement, rank: int) -> tuple[str, int]:
    """(host, port) serving prefill `rank`'s blocks, from a request's kv_transfer_params.

    Ports follow Mooncake's handshake rule (side-channel port + pcp_rank * TP + tp_rank) unless
    `remote_ports` (rank -> port) names them (the sim serves all ranks from one port); hosts
    come from `remote_hosts` (rank -> IP, for instances spanning nodes) or `remote_host`."""
    pcp_rank, tp_rank = prefill.split(rank)
    hosts = params.get("remote_hosts") or {}
    host = hosts.get(str(rank), hosts.get(rank)) if isinstance(hosts, Mapping) else None
    if host is None:
        host = params.get("remote_host")
    if not host:
        raise ValueError(
            f"kv_transfer_params name no host for prefill rank {rank}: pass the "
            "kv_transfer_params (remote_host / remote_hosts) the prefill instance returned"
        )
    ports = params.get("remote_ports") or {}
    port = ports.get(str(rank), ports.get(rank)) if isinstance(ports, Mapping) else None
    if port is None:
        port = int(params["remote_port"]) + pcp_rank * prefill.tp + tp_rank
    return str(host), int(port)
