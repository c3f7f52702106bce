"""Write new tokens' K and V into paged caches (vLLM's reshape_and_cache).

Caches are (num_blocks, block_size, heads, head_size) with any strides, so the per-layer views
of a cross-layer buffer (blocks, layers, block_size, heads, head_size) are written in place.
K and V head sizes are independent (MLA-like latent 512 with rope 64). A slot_mapping entry
of -1 (a padding token) is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend_kernels.device import grid_size, pow2_ceil, pow2_floor, tile_budget_bytes


@triton.jit
def _write_rows(
    src_ptr, cache_ptr, tok, block, offset, keep, heads, head_size,
    s_t, s_h, s_d, c_b, c_o, c_h, c_d,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    # A token's (head, dim) elements, flattened: any head/dim strides on either side.
    for e0 in range(0, heads * head_size, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        h = e // head_size
        d = e % head_size
        mask = keep[:, None] & (e < heads * head_size)[None, :]
        rows = tl.load(src_ptr + tok[:, None] * s_t + (h * s_h + d * s_d)[None, :], mask=mask)
        dst = cache_ptr + (block * c_b + offset * c_o)[:, None] + (h * c_h + d * c_d)[None, :]
        tl.store(dst, rows.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    num_tokens, heads, k_size, v_size, block_size,
    sk_t, sk_h, sk_d, sv_t, sv_h, sv_d,
    kc_b, kc_o, kc_h, kc_d, vc_b, vc_o, vc_h, vc_d,
    BLOCK_T: tl.constexpr, BLOCK_EK: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for t0 in range(pid * BLOCK_T, num_tokens, nprog * BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        # Token offsets stay int32 (one step's K/V); cache offsets go int64 through the slot.
        slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
        keep = slot >= 0
        block = slot // block_size
        offset = slot % block_size
        _write_rows(k_ptr, kc_ptr, tok, block, offset, keep, heads, k_size,
                    sk_t, sk_h, sk_d, kc_b, kc_o, kc_h, kc_d, BLOCK_EK)  # fmt: skip
        _write_rows(v_ptr, vc_ptr, tok, block, offset, keep, heads, v_size,
                    sv_t, sv_h, sv_d, vc_b, vc_o, vc_h, vc_d, BLOCK_EV)  # fmt: skip


MAX_TILE_TOKENS = 16
MAX_TILE_TOKENS_CUDA = 8
LAUNCH_CUDA = {"num_warps": 4}


def _tiles(
    heads: int, k_size: int, v_size: int, budget_elems: int, max_tokens: int
) -> tuple[int, int, int]:
    """(tokens, K elements, V elements) per tile: whole tokens where the budget allows."""
    block_ek = min(pow2_ceil(heads * k_size), budget_elems)
    block_ev = min(pow2_ceil(heads * v_size), budget_elems)
    block_t = max(1, min(max_tokens, pow2_floor(budget_elems // max(block_ek, block_ev))))
    return block_t, block_ek, block_ev


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store key (tokens, heads, k_size) and value (tokens, heads, v_size) at their slots."""
    tokens, heads, k_size = key.shape
    if value.shape[:2] != (tokens, heads):
        raise ValueError(
            f"value must be (tokens={tokens}, heads={heads}, v_size), got {tuple(value.shape)}"
        )
    v_size = value.shape[2]
    block_size = key_cache.shape[1]
    if key_cache.shape[1:] != (block_size, heads, k_size):
        raise ValueError(
            f"key_cache must be (blocks, block_size, {heads}, {k_size}), "
            f"got {tuple(key_cache.shape)}"
        )
    if (
        value_cache.shape[1:] != (block_size, heads, v_size)
        or value_cache.shape[0] != key_cache.shape[0]
    ):
        raise ValueError(
            f"value_cache must be ({key_cache.shape[0]}, {block_size}, {heads}, {v_size}), "
            f"got {tuple(value_cache.shape)}"
        )
    if slot_mapping.shape != (tokens,):
        raise ValueError(
            f"slot_mapping must be (tokens={tokens},), got {tuple(slot_mapping.shape)}"
        )
    if tokens == 0:
        return
    cuda = key.device.type == "cuda"
    block_t, block_ek, block_ev = _tiles(
        heads, k_size, v_size, tile_budget_bytes(key.device) // 4,
        MAX_TILE_TOKENS_CUDA if cuda else MAX_TILE_TOKENS,
    )  # fmt: skip
    _reshape_and_cache_kernel[(grid_size(key.device, triton.cdiv(tokens, block_t)),)](
        key, value, key_cache, value_cache, slot_mapping,
        tokens, heads, k_size, v_size, block_size,
        *key.stride(), *value.stride(), *key_cache.stride(), *value_cache.stride(),
        BLOCK_T=block_t, BLOCK_EK=block_ek, BLOCK_EV=block_ev, **(LAUNCH_CUDA if cuda else {}),
    )  # fmt: skip


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference: index_put through the caches' own views (any strides)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)
