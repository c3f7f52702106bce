"""MoE token permute (group tokens by expert) and unpermute (combine with top-k weights).

For expert parallelism each rank holds ``num_experts`` local experts; a top-k id outside
[0, num_experts) belongs to another rank and is skipped here (its weight counts as zero in the
combine). Every expert's segment starts at a byte offset that is a multiple of 512, as fused
dispatch/combine buffers and grouped GEMMs want; padding rows are left unwritten.

The routing bookkeeping (a stable sort by expert, counts, offsets) is done with torch ops on
the device; the Triton kernels move the rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ascend_kernels.device import grid_size, pow2_ceil, pow2_floor, tile_budget_bytes

SEGMENT_ALIGN_BYTES = 512


class Permuted(NamedTuple):
    """Rows grouped by expert, and how to find them again."""

    rows: torch.Tensor
    """(capacity, hidden): expert e's tokens at rows[offsets[e] : offsets[e] + counts[e]]."""
    offsets: torch.Tensor
    """(num_experts + 1,) int64 segment starts (aligned); offsets[-1] is the rows in use."""
    counts: torch.Tensor
    """(num_experts,) int64 tokens routed to each expert."""
    row_of: torch.Tensor
    """(tokens, top_k) int64 row of each (token, k) in ``rows``; -1 where not local."""


def align_rows(hidden_size: int, element_size: int, align_bytes: int = SEGMENT_ALIGN_BYTES) -> int:
    """Rows per alignment unit: segment starts are multiples of this many rows."""
    return align_bytes // math.gcd(align_bytes, hidden_size * element_size)


def capacity(tokens: int, top_k: int, num_experts: int, unit: int) -> int:
    """Rows the permuted buffer needs in the worst case (every segment padded)."""
    return tokens * top_k + num_experts * (unit - 1)


class Routing(NamedTuple):
    """Where each (token, k) goes; computed once, used by permute and unpermute."""

    offsets: torch.Tensor
    counts: torch.Tensor
    row_of: torch.Tensor


@triton.jit
def _route_rows_kernel(
    sorted_ptr, order_ptr, bounds_ptr, offsets_ptr, row_ptr, n, num_experts,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for j0 in range(pid * BLOCK, n, nprog * BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < n
        e = tl.load(sorted_ptr + j, mask=ok, other=num_experts)
        local = e < num_experts
        safe = tl.where(local, e, 0)
        start = tl.load(offsets_ptr + safe, mask=ok & local, other=0)
        first = tl.load(bounds_ptr + safe, mask=ok & local, other=0)
        row = tl.where(local, start + (j - first), -1)
        src = tl.load(order_ptr + j, mask=ok, other=0)
        tl.store(row_ptr + src, row, mask=ok)


def route(topk_ids: torch.Tensor, num_experts: int, unit: int) -> Routing:
    """Segments and rows for `topk_ids` (tokens, top_k), with no host sync: a stable sort by
    expert, segment bounds by binary search, aligned offsets, then one kernel for the rows."""
    tokens, top_k = topk_ids.shape
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    # Non-local ids sort last, into a bucket of their own.
    bucket = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts).to(torch.int32)
    sorted_bucket, order = torch.sort(bucket, stable=True)
    experts = torch.arange(num_experts + 1, dtype=torch.int32, device=device)
    bounds = torch.searchsorted(sorted_bucket, experts)  # first sorted position of each expert
    counts = bounds[1:] - bounds[:-1]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum((counts + unit - 1) // unit * unit, 0)
    row_of = torch.empty(tokens * top_k, dtype=torch.long, device=device)
    if row_of.numel():
        block = 1024
        _route_rows_kernel[(grid_size(device, triton.cdiv(row_of.numel(), block)),)](
            sorted_bucket, order, bounds, offsets, row_of, row_of.numel(), num_experts,
            BLOCK=block,
        )  # fmt: skip
    return Routing(offsets, counts, row_of.view(tokens, top_k))


@triton.jit
def _permute_kernel(
    x_ptr, out_ptr, row_ptr, tokens, top_k, hidden, sx_t, sx_h, so_r, so_h,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_h = tl.cdiv(hidden, BLOCK_H)
    for item in range(pid, tokens * n_h, nprog):
        t = item // n_h
        h = (item % n_h) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = h < hidden
        vals = tl.load(x_ptr + t * sx_t + h * sx_h, mask=mask)
        for k in range(top_k):
            row = tl.load(row_ptr + t * top_k + k)
            if row >= 0:
                tl.store(out_ptr + row * so_r + h * so_h, vals, mask=mask)


@triton.jit
def _unpermute_kernel(
    rows_ptr, row_ptr, w_ptr, out_ptr, tokens, top_k, hidden, sr_r, sr_h, so_t, so_h,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_h = tl.cdiv(hidden, BLOCK_H)
    for item in range(pid, tokens * n_h, nprog):
        t = item // n_h
        h = (item % n_h) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = h < hidden
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k in range(top_k):
            row = tl.load(row_ptr + t * top_k + k)
            w = tl.load(w_ptr + t * top_k + k).to(tl.float32)
            vals = tl.load(
                rows_ptr + row * sr_r + h * sr_h,
                mask=mask & (row + tl.zeros_like(h) >= 0),
                other=0.0,
            )
            acc += w * vals.to(tl.float32)
        tl.store(out_ptr + t * so_t + h * so_h, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_h(hidden: int, device: torch.device) -> int:
    return min(pow2_ceil(hidden), pow2_floor(tile_budget_bytes(device) // 4))


def moe_permute(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    routing: Routing | None = None,
) -> Permuted:
    """Group each token's copies by expert into aligned per-expert segments (``routing``
    from :func:`route` when the caller computed it already)."""
    tokens, hidden = hidden_states.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens:
        raise ValueError(f"topk_ids must be (tokens={tokens}, top_k), got {tuple(topk_ids.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    top_k = topk_ids.shape[1]
    unit = align_rows(hidden, hidden_states.element_size())
    offsets, counts, row_of = routing or route(topk_ids, num_experts, unit)
    rows = hidden_states.new_empty((capacity(tokens, top_k, num_experts, unit), hidden))
    if tokens and top_k:
        block_h = _block_h(hidden, hidden_states.device)
        _permute_kernel[(grid_size(hidden_states.device, tokens * triton.cdiv(hidden, block_h)),)](
            hidden_states, rows, row_of, tokens, top_k, hidden,
            *hidden_states.stride(), *rows.stride(), BLOCK_H=block_h,
        )  # fmt: skip
    return Permuted(rows, offsets, counts, row_of)


def moe_unpermute(
    rows: torch.Tensor, row_of: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * rows[row_of[t, k]] (rows of -1 contribute nothing)."""
    tokens, top_k = row_of.shape
    if topk_weights.shape != (tokens, top_k):
        raise ValueError(
            f"topk_weights must be ({tokens}, {top_k}), got {tuple(topk_weights.shape)}"
        )
    hidden = rows.shape[1]
    out = rows.new_empty((tokens, hidden))
    if tokens:
        block_h = _block_h(hidden, rows.device)
        _unpermute_kernel[(grid_size(rows.device, tokens * triton.cdiv(hidden, block_h)),)](
            rows, row_of.contiguous(), topk_weights.contiguous(), out, tokens, top_k, hidden,
            *rows.stride(), *out.stride(), BLOCK_H=block_h,
        )  # fmt: skip
    return out


# --- torch references ------------------------------------------------------------------------


def moe_permute_ref(
    hidden_states: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> list[torch.Tensor]:
    """Per expert, its tokens' rows in token order (the grouping a permute must produce)."""
    return [hidden_states[(topk_ids == e).any(dim=1)] for e in range(num_experts)]


def moe_unpermute_ref(
    expert_out: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Combine per-(token, k) expert outputs (tokens, top_k, hidden) with the local weights."""
    local = ((topk_ids >= 0) & (topk_ids < num_experts)).to(torch.float32)
    weights = topk_weights.float() * local
    return (expert_out.float() * weights[..., None]).sum(dim=1).to(expert_out.dtype)
