"""vLLM's prefix-cache block hashes, computed outside vLLM, so that a router can look up in
the KV events of real vLLM engines the blocks of a prompt it has tokenized the same way.

vLLM (0.3x, `vllm/v1/core/kv_cache_utils.py`) hashes each full block of `block_size` tokens
as hash((parent, tuple(tokens), extra_keys)), the parent of the first block being NONE_HASH =
hash(seed). The seed is PYTHONHASHSEED when the engine has it set, otherwise the fixed
"vllm-none-hash" for the cryptographic algorithms (sha256, sha256_cbor; older lines drew a
random one per process, so the planner sets PYTHONHASHSEED). Its KV events carry each block
hash as the low 64 bits of its big-endian value (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, on by
default). A request's cache salt keys its first block (modelled here). LoRA adapters,
multimodal inputs and prompt embeddings add keys that are not modelled: the router serves no
LoRA names, and places multimodal and prompt-embedding requests by load."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cbor2

VllmHashAlgo = Literal["sha256", "sha256_cbor"]
DEFAULT_SEED = "vllm-none-hash"
"""vLLM's seed of NONE_HASH for cryptographic algorithms when PYTHONHASHSEED is unset."""

_MASK = (1 << 64) - 1


def _sha256_pickle(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(value: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


_ALGOS: dict[str, Callable[[Any], bytes]] = {"sha256": _sha256_pickle, "sha256_cbor": _sha256_cbor}


def external(block_hash: bytes) -> int:
    """A block hash as vLLM's KV events carry it."""
    return int.from_bytes(block_hash, "big") & _MASK


class VllmBlockHasher:
    """Block hashes of token sequences as a vLLM engine with `--prefix-caching-hash-algo
    algo` (and PYTHONHASHSEED=`seed`, or none) computes them, in the KV events' form."""

    def __init__(self, algo: VllmHashAlgo = "sha256", seed: str | None = None) -> None:
        if algo not in _ALGOS:
            raise ValueError(f"prefix caching hash algorithm {algo!r}: use one of {sorted(_ALGOS)}")
        self._hash = _ALGOS[algo]
        self.none_hash = self._hash(DEFAULT_SEED if seed is None else seed)

    def block_hashes(
        self, tokens: Sequence[int], block_size: int, cache_salt: str | None = None
    ) -> list[int]:
        """The hashes of the full blocks of `tokens` (token ids as vLLM sees the prompt), of a
        request with `cache_salt` when given (vLLM 0.3x keys its first block with it)."""
        first = (("cache_salt", cache_salt),) if cache_salt else None
        return self.chain(self.none_hash, tokens, block_size, first)[0]

    def chain(
        self,
        parent: bytes,
        tokens: Sequence[int],
        block_size: int,
        first_extra: tuple[Any, ...] | None = None,
    ) -> tuple[list[int], bytes]:
        """The full blocks of `tokens` chained after the block whose full hash is `parent`
        (none_hash before the first): their hashes in the events' form, and the last full
        hash (`parent` when there is no full block). `first_extra`: the first block's extra
        keys."""
        out, extra = [], first_extra
        for start in range(0, len(tokens) // block_size * block_size, block_size):
            parent = self._hash((parent, tuple(tokens[start : start + block_size]), extra))
            out.append(external(parent))
            extra = None
        return out, parent
