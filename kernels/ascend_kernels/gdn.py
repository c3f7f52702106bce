"""Gated delta rule (GDN) attention of hybrid linear-attention models (Qwen3-Next, Qwen3.5).

Per value head, with state S (K x V), log decay g_t, write strength beta_t, and scale s::

    S   <- exp(g_t) * S
    S   <- S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t  = s * S^T q_t

Key heads may be fewer than value heads (value head h reads key head h // (Hv / Hk)).

Prefill runs chunked (64 tokens, the WY form with a blocked triangular solve): see
:mod:`ascend_kernels.gdn_prefill`, whose entry points this module re-exports.

Decode runs the recurrence for one token per sequence against its cached state, in place.
Layouts (varlen, tokens packed): q, k (tokens, Hk, K); v (tokens, Hv, V); g, beta (tokens, Hv);
states (N or slots, Hv, K, V) in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ascend_kernels.device import grid_size, pow2_ceil
from ascend_kernels.gdn_prefill import (
    CHUNK,
    ChunkMetadata,
    check_shapes,
    chunk_gated_delta_rule,
    chunk_metadata,
    dense_rows,
    dot_precision,
)

__all__ = [
    "CHUNK",
    "ChunkMetadata",
    "chunk_gated_delta_rule",
    "chunk_metadata",
    "dot_precision",
    "gated_delta_rule_decode",
    "gated_delta_rule_ref",
]


@triton.jit
def _gdn_decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, state_ptr, idx_ptr,
    batch, hv_heads, group, scale,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sg_b, sg_h, sb_b, sb_h, so_b, so_h,
    ss_n, ss_h, ss_k,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    n_v = tl.cdiv(V, BV)
    for item in range(pid, batch * hv_heads * n_v, nprog):
        b = item // (hv_heads * n_v)
        h = (item // n_v) % hv_heads
        vcol = (item % n_v) * BV + cv
        slot = tl.load(idx_ptr + b).to(tl.int64)
        if slot >= 0:
            hk = h // group
            kmask = ck < K
            vmask = vcol < V
            q = tl.load(q_ptr + b * sq_b + hk * sq_h + ck, mask=kmask, other=0.0).to(tl.float32)
            kk = tl.load(k_ptr + b * sk_b + hk * sk_h + ck, mask=kmask, other=0.0).to(tl.float32)
            vv = tl.load(v_ptr + b * sv_b + h * sv_h + vcol, mask=vmask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + b * sg_b + h * sg_h).to(tl.float32)
            beta = tl.load(beta_ptr + b * sb_b + h * sb_h).to(tl.float32)
            off = slot * ss_n + h * ss_h + ck[:, None] * ss_k + vcol[None, :]
            smask = kmask[:, None] & vmask[None, :]
            s = tl.load(state_ptr + off, mask=smask, other=0.0) * tl.exp(g)
            v_new = (vv - tl.sum(s * kk[:, None], axis=0)) * beta
            s = s + kk[:, None] * v_new[None, :]
            o = tl.sum(s * q[:, None], axis=0) * scale
            tl.store(o_ptr + b * so_b + h * so_h + vcol, o.to(o_ptr.dtype.element_ty), mask=vmask)
            tl.store(state_ptr + off, s, mask=smask)


def gated_delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One token per sequence: q, k (batch, Hk, K); v (batch, Hv, V); g, beta (batch, Hv).

    Advances ``states[state_indices[b]]`` (fp32, (slots, Hv, K, V)) in place; an index of -1
    is padding (no output written, no state touched). Returns o (batch, Hv, V).
    """
    batch, hk, hv, kdim, vdim = check_shapes(q, k, v, g, beta)
    q, k, v = dense_rows(q), dense_rows(k), dense_rows(v)
    if states.dim() != 4 or states.shape[1:] != (hv, kdim, vdim) or states.dtype != torch.float32:
        raise ValueError(
            f"states must be fp32 (slots, {hv}, {kdim}, {vdim}), "
            f"got {tuple(states.shape)} {states.dtype}"
        )
    if states.stride(-1) != 1:
        raise ValueError("states must be dense in their last (V) dimension")
    if state_indices.shape != (batch,):
        raise ValueError(
            f"state_indices must be (batch={batch},), got {tuple(state_indices.shape)}"
        )
    o = v.new_zeros((batch, hv, vdim))
    if batch == 0:
        return o
    scale = kdim**-0.5 if scale is None else scale
    bk = pow2_ceil(kdim)
    bv = min(pow2_ceil(vdim), max(16, 8192 // bk))  # an 8K-element state tile per program
    _gdn_decode_kernel[(grid_size(q.device, batch * hv * triton.cdiv(vdim, bv)),)](
        q, k, v, g, beta, o, states, state_indices,
        batch, hv, hv // hk, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), o.stride(0), o.stride(1),
        states.stride(0), states.stride(1), states.stride(2),
        K=kdim, V=vdim, BK=bk, BV=bv,
    )  # fmt: skip
    return o


# --- torch reference -------------------------------------------------------------------------


def gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive recurrence, one token at a time in fp32 (all heads at once)."""
    tokens, hk, kdim = k.shape
    hv, vdim = v.shape[1], v.shape[2]
    scale = kdim**-0.5 if scale is None else scale
    group = hv // hk
    o = torch.empty((tokens, hv, vdim), dtype=torch.float32, device=v.device)
    bounds = cu_seqlens.tolist()
    final = torch.zeros((len(bounds) - 1, hv, kdim, vdim), dtype=torch.float32, device=v.device)
    qf = q.float().repeat_interleave(group, dim=1)
    kf = k.float().repeat_interleave(group, dim=1)
    vf, gf, bf = v.float(), g.float(), beta.float()
    for s in range(len(bounds) - 1):
        state = initial_state[s].float().clone() if initial_state is not None else final[s]
        for t in range(bounds[s], bounds[s + 1]):
            state = state * gf[t].exp()[:, None, None]
            kv = torch.einsum("hkv,hk->hv", state, kf[t])
            v_new = (vf[t] - kv) * bf[t][:, None]
            state = state + kf[t][:, :, None] * v_new[:, None, :]
            o[t] = torch.einsum("hkv,hk->hv", state, qf[t]) * scale
        final[s] = state
    return o.to(v.dtype), final
