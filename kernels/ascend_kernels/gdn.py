"""Gated delta rule (GDN) attention of hybrid linear-attention models (Qwen3-Next, Qwen3.5).

Per value head, with state S (K x V), log decay g_t, write strength beta_t, and scale s::

    S   <- exp(g_t) * S
    S   <- S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t  = s * S^T q_t

Key heads may be fewer than value heads (value head h reads key head h // (Hv / Hk)).

Prefill runs chunked (64 tokens): per chunk, the WY form turns the sequential updates into a
triangular solve, T = (I + A)^-1 with A_ij = beta_i exp(G_i - G_j) k_i.k_j (j < i, G the
in-chunk cumulative decay), so that w = T (beta exp(G) k) and u = T (beta v); then one pass per
sequence carries the state across chunks: v' = u - w S, o = s[(q exp(G)) S + causal(q k^T
exp(G_i - G_j)) v'], S <- exp(G_last) S + (k exp(G_last - G))^T v'.

Decode runs the recurrence for one token per sequence against its cached state, in place.
Layouts (varlen, tokens packed): q, k (tokens, Hk, K); v (tokens, Hv, V); g, beta (tokens, Hv);
states (N or slots, Hv, K, V) in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ascend_kernels.device import grid_size, pow2_ceil

CHUNK = 64
PREPARE_LAUNCH = {"num_warps": 8, "num_stages": 1}
SCAN_LAUNCH = {"num_warps": 8, "num_stages": 1}
SCAN_BV = 32
DOT_PRECISION_CUDA = "tf32"
"""CUDA launch options and the scan's value tile (its K x BV state and 64 x K operands must
fit in shared memory)."""


class ChunkMetadata(NamedTuple):
    """Where each chunk of a packed batch lies, built on the host from cu_seqlens."""

    indices: torch.Tensor
    """(num_chunks, 2) int32: (sequence, chunk within the sequence)."""
    offsets: torch.Tensor
    """(sequences + 1,) int32: first global chunk of each sequence."""
    num_chunks: int


def chunk_metadata(
    cu_seqlens: torch.Tensor | list[int], device: torch.device | str, chunk: int = CHUNK
) -> ChunkMetadata:
    """Build chunk indices/offsets on the CPU, stage them in pinned memory and copy them to
    `device` without blocking (the step does not wait on a host-to-device sync)."""
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    counts = [(bounds[i + 1] - bounds[i] + chunk - 1) // chunk for i in range(len(bounds) - 1)]
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    pairs = [(s, c) for s, n in enumerate(counts) for c in range(n)]
    device = torch.device(device)
    pin = device.type in ("cuda", "npu")
    host_indices = torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2)
    host_offsets = torch.tensor(offsets, dtype=torch.int32)
    if pin:
        host_indices, host_offsets = host_indices.pin_memory(), host_offsets.pin_memory()
    return ChunkMetadata(
        host_indices.to(device, non_blocking=True),
        host_offsets.to(device, non_blocking=True),
        offsets[-1],
    )


@triton.jit
def _gdn_chunk_prepare_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr, cu_ptr, idx_ptr, w_ptr, u_ptr, gc_ptr,
    num_chunks, hv_heads, group,
    sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sb_t, sb_h, sw_t, sw_h, su_t, su_h, sgc_t, sgc_h,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    lower = r[:, None] > r[None, :]
    for item in range(pid, num_chunks * hv_heads, nprog):
        chunk = item // hv_heads
        h = item % hv_heads
        seq = tl.load(idx_ptr + 2 * chunk)
        c = tl.load(idx_ptr + 2 * chunk + 1)
        start = tl.load(cu_ptr + seq) + c * C
        end = tl.minimum(tl.load(cu_ptr + seq + 1), start + C)
        rows = start + r
        ok = rows < end
        hk = h // group
        g = tl.load(g_ptr + rows * sg_t + h * sg_h, mask=ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + rows * sb_t + h * sb_h, mask=ok, other=0.0).to(tl.float32)
        gcum = tl.cumsum(g, axis=0)
        kk = tl.load(
            k_ptr + rows[:, None] * sk_t + hk * sk_h + ck[None, :],
            mask=ok[:, None] & (ck < K)[None, :],
            other=0.0,
        ).to(tl.float32)
        decay = tl.exp(tl.where(lower, gcum[:, None] - gcum[None, :], float("-inf")))
        a = tl.dot(kk, tl.trans(kk), input_precision=PREC) * decay * beta[:, None]
        # T = (I + A)^-1 by forward substitution, one row at a time (A is strictly lower).
        t = (r[:, None] == r[None, :]).to(tl.float32)
        for i in range(1, C):
            a_i = tl.sum(tl.where(r[:, None] == i, a, 0.0), axis=0)
            t = tl.where(r[:, None] == i, t - tl.sum(a_i[:, None] * t, axis=0)[None, :], t)
        kb = kk * (beta * tl.exp(gcum))[:, None]
        w = tl.dot(t, kb, input_precision=PREC)
        tl.store(
            w_ptr + rows[:, None] * sw_t + h * sw_h + ck[None, :],
            w.to(w_ptr.dtype.element_ty),
            mask=ok[:, None] & (ck < K)[None, :],
        )
        for v0 in range(0, V, BV):
            vmask = ok[:, None] & (v0 + cv < V)[None, :]
            vv = tl.load(
                v_ptr + rows[:, None] * sv_t + h * sv_h + v0 + cv[None, :], mask=vmask, other=0.0
            )
            u = tl.dot(t, vv.to(tl.float32) * beta[:, None], input_precision=PREC)
            tl.store(
                u_ptr + rows[:, None] * su_t + h * su_h + v0 + cv[None, :],
                u.to(u_ptr.dtype.element_ty),
                mask=vmask,
            )
        tl.store(gc_ptr + rows * sgc_t + h * sgc_h, gcum, mask=ok)


@triton.jit
def _gdn_chunk_scan_kernel(
    q_ptr, k_ptr, w_ptr, u_ptr, gc_ptr, o_ptr, h0_ptr, ht_ptr, cu_ptr,
    num_seqs, hv_heads, group, scale,
    sq_t, sq_h, sk_t, sk_h, sw_t, sw_h, su_t, su_h, sgc_t, sgc_h, so_t, so_h,
    sh_n, sh_h, sh_k,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    causal = r[:, None] >= r[None, :]
    n_v = tl.cdiv(V, BV)
    for item in range(pid, num_seqs * hv_heads * n_v, nprog):
        seq = item // (hv_heads * n_v)
        h = (item // n_v) % hv_heads
        v0 = (item % n_v) * BV
        hk = h // group
        start = tl.load(cu_ptr + seq)
        end = tl.load(cu_ptr + seq + 1)
        vcol = v0 + cv
        smask = (ck < K)[:, None] & (vcol < V)[None, :]
        state_off = seq.to(tl.int64) * sh_n + h * sh_h + ck[:, None] * sh_k + vcol[None, :]
        if HAS_H0:
            s = tl.load(h0_ptr + state_off, mask=smask, other=0.0).to(tl.float32)
        else:
            s = tl.zeros((BK, BV), dtype=tl.float32)
        for c0 in range(start, end, C):
            rows = c0 + r
            ok = rows < end
            kmask = ok[:, None] & (ck < K)[None, :]
            vmask = ok[:, None] & (vcol < V)[None, :]
            q = tl.load(
                q_ptr + rows[:, None] * sq_t + hk * sq_h + ck[None, :], mask=kmask, other=0.0
            ).to(tl.float32)
            kk = tl.load(
                k_ptr + rows[:, None] * sk_t + hk * sk_h + ck[None, :], mask=kmask, other=0.0
            ).to(tl.float32)
            w = tl.load(
                w_ptr + rows[:, None] * sw_t + h * sw_h + ck[None, :], mask=kmask, other=0.0
            ).to(tl.float32)
            u = tl.load(
                u_ptr + rows[:, None] * su_t + h * su_h + vcol[None, :], mask=vmask, other=0.0
            ).to(tl.float32)
            gc = tl.load(gc_ptr + rows * sgc_t + h * sgc_h, mask=ok, other=0.0)
            g_last = tl.sum(tl.where(rows == tl.minimum(c0 + C, end) - 1, gc, 0.0), axis=0)
            v_new = u - tl.dot(w, s, input_precision=PREC)
            qk = tl.dot(q, tl.trans(kk), input_precision=PREC)
            qk = tl.where(
                causal, qk * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0
            )
            o = tl.dot(q * tl.exp(gc)[:, None], s, input_precision=PREC) + tl.dot(
                qk, v_new, input_precision=PREC
            )
            tl.store(
                o_ptr + rows[:, None] * so_t + h * so_h + vcol[None, :],
                (o * scale).to(o_ptr.dtype.element_ty),
                mask=vmask,
            )
            kd = kk * tl.where(ok, tl.exp(g_last - gc), 0.0)[:, None]
            s = s * tl.exp(g_last) + tl.dot(tl.trans(kd), v_new, input_precision=PREC)
        if STORE_HT:
            tl.store(ht_ptr + state_off, s, mask=smask)


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[int, int, int, int, int]:
    """(tokens, Hk, Hv, K, V) after checking every shape against the others."""
    if q.shape != k.shape or q.dim() != 3:
        raise ValueError(
            f"q and k must be (tokens, Hk, K) alike, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    tokens, hk, kdim = k.shape
    if v.dim() != 3 or v.shape[0] != tokens or v.shape[1] % hk:
        raise ValueError(
            f"v must be (tokens={tokens}, Hv (a multiple of Hk={hk}), V), got {tuple(v.shape)}"
        )
    hv, vdim = v.shape[1], v.shape[2]
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (tokens, hv):
            raise ValueError(f"{name} must be (tokens={tokens}, Hv={hv}), got {tuple(t.shape)}")
    return tokens, hk, hv, kdim, vdim


def dot_precision(device: torch.device) -> str:
    """fp32 matmuls: TF32 on NVIDIA tensor cores (H100, 8k tokens: 3.5 ms against 22 ms for
    IEEE fp32, relative error about 0.3%; "tf32x3" crashed with triton 3.6 at K = 128), IEEE
    fp32 elsewhere (the interpreter and NPUs)."""
    return DOT_PRECISION_CUDA if device.type == "cuda" else "ieee"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dimension densely."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiles(kdim: int, vdim: int) -> tuple[int, int]:
    """Key tile (whole K: the state is K x BV) and value tile; tl.dot wants >= 16."""
    return max(16, pow2_ceil(kdim)), max(16, min(SCAN_BV, pow2_ceil(vdim)))


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    metadata: ChunkMetadata | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GDN prefill over packed sequences; returns (o (tokens, Hv, V), final states).

    ``cu_seqlens`` lives on the device; pass ``metadata`` built from its host copy by
    :func:`chunk_metadata` (built here, with a sync, when omitted).
    """
    tokens, hk, hv, kdim, vdim = _check(q, k, v, g, beta)
    q, k, v = _rows(q), _rows(k), _rows(v)
    num_seqs = cu_seqlens.numel() - 1
    if initial_state is not None:
        if initial_state.shape != (num_seqs, hv, kdim, vdim):
            raise ValueError(
                f"initial_state must be ({num_seqs}, {hv}, {kdim}, {vdim}), "
                f"got {tuple(initial_state.shape)}"
            )
        initial_state = initial_state.float().contiguous()
    scale = kdim**-0.5 if scale is None else scale
    o = v.new_empty((tokens, hv, vdim))
    final = (
        q.new_empty((num_seqs, hv, kdim, vdim), dtype=torch.float32) if output_final_state else None
    )
    if num_seqs <= 0:
        return o, final
    if metadata is None:
        metadata = chunk_metadata(cu_seqlens.cpu(), q.device)
    w = torch.empty((tokens, hv, kdim), dtype=torch.float32, device=q.device)
    u = torch.empty((tokens, hv, vdim), dtype=torch.float32, device=q.device)
    gc = torch.empty((tokens, hv), dtype=torch.float32, device=q.device)
    bk, bv = _tiles(kdim, vdim)
    prec = dot_precision(q.device)
    group = hv // hk
    if metadata.num_chunks:
        _gdn_chunk_prepare_kernel[(grid_size(q.device, metadata.num_chunks * hv),)](
            k, v, g, beta, cu_seqlens, metadata.indices, w, u, gc,
            metadata.num_chunks, hv, group,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), g.stride(1),
            beta.stride(0), beta.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
            gc.stride(0), gc.stride(1),
            K=kdim, V=vdim, BK=bk, BV=bv, C=CHUNK, PREC=prec, **PREPARE_LAUNCH,
        )  # fmt: skip
    # Initial and final states are both dense (N, Hv, K, V) fp32: one set of strides.
    h_strides = (hv * kdim * vdim, kdim * vdim, vdim)
    _gdn_chunk_scan_kernel[(grid_size(q.device, num_seqs * hv * triton.cdiv(vdim, bv)),)](
        q, k, w, u, gc, o,
        initial_state if initial_state is not None else gc, final if final is not None else gc,
        cu_seqlens,
        num_seqs, hv, group, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
        u.stride(0), u.stride(1), gc.stride(0), gc.stride(1), o.stride(0), o.stride(1),
        *h_strides,
        K=kdim, V=vdim, BK=bk, BV=bv, C=CHUNK,
        HAS_H0=initial_state is not None, STORE_HT=final is not None, PREC=prec,
        **SCAN_LAUNCH,
    )  # fmt: skip
    return o, final


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
    batch, hk, hv, kdim, vdim = _check(q, k, v, g, beta)
    q, k, v = _rows(q), _rows(k), _rows(v)
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
