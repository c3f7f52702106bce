"""Prefix-cache block hashes: one chain per token sequence, as vLLM's automatic prefix caching
builds it. Block i's hash covers block i-1's hash and block i's tokens, so two sequences share
a block's hash only when they share every token up to its end. Only full blocks are hashed.

The sim engine keys its cache with these and publishes them in its KV events; the router
hashes a request's prompt the same way to find where its prefix lives. (Real vLLM seeds its
chain with a per-process random value unless PYTHONHASHSEED is set, and hashes with sha256 over
CBOR; these hashes match our own engines, not vLLM's.)
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
from collections.abc import Sequence

ROOT_HASH = 0
"""The parent of a sequence's first block."""


def hash_block(parent: int, tokens: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash."""
    data = struct.pack(f"<Q{len(tokens)}q", parent, *tokens)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_hashes(
    tokens: Sequence[int], block_size: int, start: Sequence[int] = (), limit: int | None = None
) -> list[int]:
    """Hashes of the full blocks of `tokens`, continuing the chain `start` (hashes already
    known for the first blocks); at most `limit` blocks in all. Same values as hash_block,
    block by block; the tokens are packed once (a router hashes 8k-token prompts per request)."""
    hashes = list(start)
    full = len(tokens) // block_size
    if limit is not None:
        full = min(full, limit)
    if full <= len(hashes):
        return hashes[:full] if limit is not None and len(hashes) > full else hashes
    first = len(hashes) * block_size
    packed = array.array("q", tokens[first : full * block_size])
    if sys.byteorder == "big":
        packed.byteswap()
    data, step = packed.tobytes(), 8 * block_size
    parent = hashes[-1] if hashes else ROOT_HASH
    blake2b = hashlib.blake2b
    for offset in range(0, len(data), step):
        digest = blake2b(parent.to_bytes(8, "little") + data[offset : offset + step],
                         digest_size=8).digest()  # fmt: skip
        parent = int.from_bytes(digest, "little")
        hashes.append(parent)
    return hashes
