"""Chunked GDN prefill over packed sequences, in three kernels.

Per chunk of 64 tokens and value head (all chunks of all sequences in parallel):

1. ``_wy_kernel``: in-chunk cumulative decay G, A_ij = beta_i exp(G_i - G_j) k_i.k_j (j < i),
   T = (I + A)^-1 solved in 16-row blocks (each diagonal block by forward substitution, the
   blocks below it from those: T_ij = -T_ii sum_{j<=m<i} A_im T_mj), then the WY factors
   w = T (beta exp(G) k) and u = T (beta v).
2. ``_state_kernel`` (one program per sequence, head and value tile, chunks in order): the state
   S at the start of each chunk is saved, v' = u - w S overwrites u, and
   S <- exp(G_last) S + (k exp(G_last - G))^T v'. This is the only sequential part, two matmuls
   per chunk.
3. ``_output_kernel`` (chunks in parallel again): o = scale [(q exp(G)) S + causal(q k^T
   exp(G_i - G_j)) v'].

The carried state stays fp32 throughout; the per-chunk snapshots that step 3 reads are kept
in the inputs' dtype when that is 16-bit (as vLLM's FLA kernels keep them), which halves the
largest scratch buffer (chunks x Hv x K x V).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ascend_kernels.device import core_count, grid_size, pow2_ceil

CHUNK = 64
WY_LAUNCH = {"num_warps": 4, "num_stages": 2}
STATE_LAUNCH = {"num_warps": 4, "num_stages": 2}
OUTPUT_LAUNCH = {"num_warps": 2, "num_stages": 1}
WY_BV = 64
WY_SPLIT = False
"""The WY step as two kernels (T per chunk, then w and u as whole 64-row products) instead of
one working in 16-row pieces."""
T_LAUNCH = {"num_warps": 4, "num_stages": 1}
WU_LAUNCH = {"num_warps": 4, "num_stages": 2}
WU_BV = 64
STATE_BV = 64
STATE_BV_ADAPT = True
"""Halve STATE_BV while the sequential kernel would still have at most one program per core."""
OUTPUT_BV = 64
"""Launch options and value tiles, fixed (no autotuning on the first call). The state tile
(K x STATE_BV fp32) and the 64 x K operands of one chunk stay within the 32 KB tile budget per
operand; STATE_BV also sets the sequential kernel's parallelism (sequences x Hv x V/STATE_BV
programs)."""
DOT_PRECISION_CUDA = "tf32"
LOW_PRECISION = True
"""16-bit inputs: keep w, u and v' in the inputs' dtype and feed every large product 16-bit
operands (fp32 accumulation), as vLLM's FLA kernels do; T is still solved in fp32. Off: fp32
scratch and TF32 products (the state 3-4x more accurate, 1.3-1.8x slower on an H200)."""
LOW_PRECISION_SOLVE = "tf32"
"""The 16 x 16 products of T's solve under LOW_PRECISION on CUDA ("ieee": FMA, slower)."""
LOW_PRECISION_KKT = True
"""Under LOW_PRECISION: A = k k^T from the 16-bit keys (exact products, fp32 sums)."""


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
def _inv_unit_lower(a, r, SPREC: tl.constexpr):
    """(I + a)^-1 for a strictly lower-triangular 16 x 16 block: a is nilpotent (a^16 = 0), so
    the inverse is the sum of (-a)^k, which factors as (I - a)(I + a^2)(I + a^4)(I + a^8):
    six small products instead of 15 dependent row steps."""
    p2 = _dot(a, a, SPREC)
    p4 = _dot(p2, p2, SPREC)
    p8 = _dot(p4, p4, SPREC)
    t = (r[:, None] == r[None, :]).to(tl.float32) - a
    t += _dot(t, p2, SPREC)
    t += _dot(t, p4, SPREC)
    return t + _dot(t, p8, SPREC)


@triton.jit
def _dot(a, b, SPREC: tl.constexpr):
    """A 16-row block product of the solve (SPREC: IEEE fp32 unless LOW_PRECISION_SOLVE)."""
    return tl.dot(a, b, input_precision=SPREC)


@triton.jit
def _a_block(ki, kj, gi, gj, bi, PREC: tl.constexpr):
    """A_ij for rows of block i and columns of block j < i (every entry below the diagonal);
    ki, kj as loaded (fp32, or the 16-bit inputs under LOW_PRECISION_KKT)."""
    return (
        tl.dot(ki, tl.trans(kj), input_precision=PREC)
        * tl.exp(gi[:, None] - gj[None, :])
        * (bi[:, None])
    )


@triton.jit
def _op(x, OPD: tl.constexpr, EMULATE: tl.constexpr):
    """`x` as a product operand: rounded to OPD. EMULATE (Triton's interpreter, whose bf16
    products are wrong) carries the rounded values in fp32, which multiplies them exactly."""
    y = x.to(OPD)
    if EMULATE:
        y = y.to(tl.float32)
    return y


@triton.jit
def _piece_rows(start, end, p, r):
    rows = start + 16 * p + r
    return rows, rows < end


@triton.jit
def _load_vec(ptr, rows, ok, s_t, head_off):
    return tl.load(ptr + rows * s_t + head_off, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _load_rows(ptr, rows, ok, col, ncols, s_t, head_off):
    return tl.load(
        ptr + rows[:, None] * s_t + head_off + col[None, :],
        mask=ok[:, None] & (col < ncols)[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _store_rows(ptr, x, rows, ok, col, ncols, s_t, head_off):
    tl.store(
        ptr + rows[:, None] * s_t + head_off + col[None, :],
        x.to(ptr.dtype.element_ty),
        mask=ok[:, None] & (col < ncols)[None, :],
    )


@triton.jit
def _apply_t(t0, t1, t2, t3, t10, t20, t21, t30, t31, t32, x0, x1, x2, x3, PREC: tl.constexpr):
    """T x for the block lower-triangular T (diagonal blocks t0..t3, t_ij below) and x in four
    16-row pieces."""
    y0 = tl.dot(t0, x0, input_precision=PREC)
    y1 = tl.dot(t10, x0, input_precision=PREC) + tl.dot(t1, x1, input_precision=PREC)
    y2 = tl.dot(t20, x0, input_precision=PREC) + tl.dot(t21, x1, input_precision=PREC)
    y2 += tl.dot(t2, x2, input_precision=PREC)
    y3 = tl.dot(t30, x0, input_precision=PREC) + tl.dot(t31, x1, input_precision=PREC)
    y3 += tl.dot(t32, x2, input_precision=PREC) + tl.dot(t3, x3, input_precision=PREC)
    return y0, y1, y2, y3


@triton.jit
def _chunk_factors(
    k_ptr, g_ptr, beta_ptr, rows0, rows1, rows2, rows3, ok0, ok1, ok2, ok3,
    h, kh, ck, r, sk_t, sg_t, sg_h, sb_t, sb_h, K: tl.constexpr, PREC: tl.constexpr,
    SPREC: tl.constexpr, KDT: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """One chunk's cumulative gates, betas and keys in four 16-row pieces, and the blocks of
    T = (I + A)^-1: diagonal t0..t3 (each inverted on its own) and t_ij below (A's products
    with KDT operands)."""
    strict = r[:, None] > r[None, :]
    # cumulative decay across the four blocks of the chunk
    g0 = tl.cumsum(_load_vec(g_ptr, rows0, ok0, sg_t, h * sg_h), 0)
    g1 = tl.cumsum(_load_vec(g_ptr, rows1, ok1, sg_t, h * sg_h), 0)
    g2 = tl.cumsum(_load_vec(g_ptr, rows2, ok2, sg_t, h * sg_h), 0)
    g3 = tl.cumsum(_load_vec(g_ptr, rows3, ok3, sg_t, h * sg_h), 0)
    g1 += tl.sum(tl.where(r == 15, g0, 0.0), 0)
    g2 += tl.sum(tl.where(r == 15, g1, 0.0), 0)
    g3 += tl.sum(tl.where(r == 15, g2, 0.0), 0)
    b0 = _load_vec(beta_ptr, rows0, ok0, sb_t, h * sb_h)
    b1 = _load_vec(beta_ptr, rows1, ok1, sb_t, h * sb_h)
    b2 = _load_vec(beta_ptr, rows2, ok2, sb_t, h * sb_h)
    b3 = _load_vec(beta_ptr, rows3, ok3, sb_t, h * sb_h)
    k0 = _load_rows(k_ptr, rows0, ok0, ck, K, sk_t, kh)
    k1 = _load_rows(k_ptr, rows1, ok1, ck, K, sk_t, kh)
    k2 = _load_rows(k_ptr, rows2, ok2, ck, K, sk_t, kh)
    k3 = _load_rows(k_ptr, rows3, ok3, ck, K, sk_t, kh)
    q0, q1 = _op(k0, KDT, EMULATE), _op(k1, KDT, EMULATE)
    q2, q3 = _op(k2, KDT, EMULATE), _op(k3, KDT, EMULATE)
    # diagonal blocks: strictly lower part only (exp of -inf above it)
    t0 = _inv_unit_lower(tl.where(strict, _a_block(q0, q0, g0, g0, b0, PREC), 0.0), r, SPREC)
    t1 = _inv_unit_lower(tl.where(strict, _a_block(q1, q1, g1, g1, b1, PREC), 0.0), r, SPREC)
    t2 = _inv_unit_lower(tl.where(strict, _a_block(q2, q2, g2, g2, b2, PREC), 0.0), r, SPREC)
    t3 = _inv_unit_lower(tl.where(strict, _a_block(q3, q3, g3, g3, b3, PREC), 0.0), r, SPREC)
    a10 = _a_block(q1, q0, g1, g0, b1, PREC)
    a20 = _a_block(q2, q0, g2, g0, b2, PREC)
    a21 = _a_block(q2, q1, g2, g1, b2, PREC)
    a30 = _a_block(q3, q0, g3, g0, b3, PREC)
    a31 = _a_block(q3, q1, g3, g1, b3, PREC)
    a32 = _a_block(q3, q2, g3, g2, b3, PREC)
    t10 = -_dot(t1, _dot(a10, t0, SPREC), SPREC)
    t21 = -_dot(t2, _dot(a21, t1, SPREC), SPREC)
    t20 = -_dot(t2, _dot(a20, t0, SPREC) + _dot(a21, t10, SPREC), SPREC)
    t32 = -_dot(t3, _dot(a32, t2, SPREC), SPREC)
    t31 = -_dot(t3, _dot(a31, t1, SPREC) + _dot(a32, t21, SPREC), SPREC)
    t30 = -_dot(t3, _dot(a30, t0, SPREC) + _dot(a31, t10, SPREC) + _dot(a32, t20, SPREC), SPREC)
    return (g0, g1, g2, g3, b0, b1, b2, b3, k0, k1, k2, k3,
            t0, t1, t2, t3, t10, t20, t21, t30, t31, t32)  # fmt: skip


@triton.jit
def _wy_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr, cu_ptr, idx_ptr, w_ptr, u_ptr, gc_ptr,
    num_chunks, hv_heads, group,
    sk_t, sk_h, sv_t, sv_h, sg_t, sg_h, sb_t, sb_h, sw_t, sw_h, su_t, su_h, sgc_t, sgc_h,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    OPD: tl.constexpr, EMULATE: tl.constexpr, SPREC: tl.constexpr, KDT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, 16)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    for item in range(pid, num_chunks * hv_heads, nprog):
        chunk = item // hv_heads
        h = item % hv_heads
        seq = tl.load(idx_ptr + 2 * chunk)
        start = tl.load(cu_ptr + seq) + tl.load(idx_ptr + 2 * chunk + 1) * 64
        end = tl.minimum(tl.load(cu_ptr + seq + 1), start + 64)
        kh = (h // group) * sk_h
        rows0, ok0 = _piece_rows(start, end, 0, r)
        rows1, ok1 = _piece_rows(start, end, 1, r)
        rows2, ok2 = _piece_rows(start, end, 2, r)
        rows3, ok3 = _piece_rows(start, end, 3, r)
        (g0, g1, g2, g3, b0, b1, b2, b3, k0, k1, k2, k3,
         t0, t1, t2, t3, t10, t20, t21, t30, t31, t32) = _chunk_factors(
            k_ptr, g_ptr, beta_ptr, rows0, rows1, rows2, rows3, ok0, ok1, ok2, ok3,
            h, kh, ck, r, sk_t, sg_t, sg_h, sb_t, sb_h, K, PREC, SPREC, KDT, EMULATE,
        )  # fmt: skip
        # w = T (beta exp(G) k), with OPD operands (fp32, or 16-bit in LOW_PRECISION)
        t0, t1 = _op(t0, OPD, EMULATE), _op(t1, OPD, EMULATE)
        t2, t3 = _op(t2, OPD, EMULATE), _op(t3, OPD, EMULATE)
        t10, t20 = _op(t10, OPD, EMULATE), _op(t20, OPD, EMULATE)
        t21, t30 = _op(t21, OPD, EMULATE), _op(t30, OPD, EMULATE)
        t31, t32 = _op(t31, OPD, EMULATE), _op(t32, OPD, EMULATE)
        k0 = _op(k0 * (b0 * tl.exp(g0))[:, None], OPD, EMULATE)
        k1 = _op(k1 * (b1 * tl.exp(g1))[:, None], OPD, EMULATE)
        k2 = _op(k2 * (b2 * tl.exp(g2))[:, None], OPD, EMULATE)
        k3 = _op(k3 * (b3 * tl.exp(g3))[:, None], OPD, EMULATE)
        w0, w1, w2, w3 = _apply_t(
            t0, t1, t2, t3, t10, t20, t21, t30, t31, t32, k0, k1, k2, k3, PREC
        )
        wh = h * sw_h
        _store_rows(w_ptr, w0, rows0, ok0, ck, K, sw_t, wh)
        _store_rows(w_ptr, w1, rows1, ok1, ck, K, sw_t, wh)
        _store_rows(w_ptr, w2, rows2, ok2, ck, K, sw_t, wh)
        _store_rows(w_ptr, w3, rows3, ok3, ck, K, sw_t, wh)
        # u = T (beta v), one value tile at a time
        vh = h * sv_h
        uh = h * su_h
        for v0 in range(0, V, BV):
            col = v0 + cv
            u0, u1, u2, u3 = _apply_t(
                t0,
                t1,
                t2,
                t3,
                t10,
                t20,
                t21,
                t30,
                t31,
                t32,
                _op(_load_rows(v_ptr, rows0, ok0, col, V, sv_t, vh) * b0[:, None], OPD, EMULATE),
                _op(_load_rows(v_ptr, rows1, ok1, col, V, sv_t, vh) * b1[:, None], OPD, EMULATE),
                _op(_load_rows(v_ptr, rows2, ok2, col, V, sv_t, vh) * b2[:, None], OPD, EMULATE),
                _op(_load_rows(v_ptr, rows3, ok3, col, V, sv_t, vh) * b3[:, None], OPD, EMULATE),
                PREC,
            )
            _store_rows(u_ptr, u0, rows0, ok0, col, V, su_t, uh)
            _store_rows(u_ptr, u1, rows1, ok1, col, V, su_t, uh)
            _store_rows(u_ptr, u2, rows2, ok2, col, V, su_t, uh)
            _store_rows(u_ptr, u3, rows3, ok3, col, V, su_t, uh)
        tl.store(gc_ptr + rows0 * sgc_t + h * sgc_h, g0, mask=ok0)
        tl.store(gc_ptr + rows1 * sgc_t + h * sgc_h, g1, mask=ok1)
        tl.store(gc_ptr + rows2 * sgc_t + h * sgc_h, g2, mask=ok2)
        tl.store(gc_ptr + rows3 * sgc_t + h * sgc_h, g3, mask=ok3)


@triton.jit
def _store_block(t_ptr, base, x, bi: tl.constexpr, bj: tl.constexpr, r):
    tl.store(t_ptr + base + (16 * bi + r)[:, None] * 64 + (16 * bj + r)[None, :], x)


@triton.jit
def _t_kernel(
    k_ptr, g_ptr, beta_ptr, cu_ptr, idx_ptr, t_ptr, gc_ptr,
    num_chunks, hv_heads, group,
    sk_t, sk_h, sg_t, sg_h, sb_t, sb_h, sgc_t, sgc_h,
    K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
    KDT: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """T = (I + A)^-1 of every (chunk, value head) as a dense 64 x 64 block (zeros above the
    diagonal blocks), and the chunk-local cumulative gates."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, 16)
    ck = tl.arange(0, BK)
    zero = tl.zeros((16, 16), dtype=tl.float32)
    for item in range(pid, num_chunks * hv_heads, nprog):
        chunk = item // hv_heads
        h = item % hv_heads
        seq = tl.load(idx_ptr + 2 * chunk)
        start = tl.load(cu_ptr + seq) + tl.load(idx_ptr + 2 * chunk + 1) * 64
        end = tl.minimum(tl.load(cu_ptr + seq + 1), start + 64)
        kh = (h // group) * sk_h
        rows0, ok0 = _piece_rows(start, end, 0, r)
        rows1, ok1 = _piece_rows(start, end, 1, r)
        rows2, ok2 = _piece_rows(start, end, 2, r)
        rows3, ok3 = _piece_rows(start, end, 3, r)
        (g0, g1, g2, g3, _, _, _, _, _, _, _, _,
         t0, t1, t2, t3, t10, t20, t21, t30, t31, t32) = _chunk_factors(
            k_ptr, g_ptr, beta_ptr, rows0, rows1, rows2, rows3, ok0, ok1, ok2, ok3,
            h, kh, ck, r, sk_t, sg_t, sg_h, sb_t, sb_h, K, PREC, SPREC, KDT, EMULATE,
        )  # fmt: skip
        base = tl.cast(item, tl.int64) * 4096
        _store_block(t_ptr, base, t0, 0, 0, r)
        _store_block(t_ptr, base, zero, 0, 1, r)
        _store_block(t_ptr, base, zero, 0, 2, r)
        _store_block(t_ptr, base, zero, 0, 3, r)
        _store_block(t_ptr, base, t10, 1, 0, r)
        _store_block(t_ptr, base, t1, 1, 1, r)
        _store_block(t_ptr, base, zero, 1, 2, r)
        _store_block(t_ptr, base, zero, 1, 3, r)
        _store_block(t_ptr, base, t20, 2, 0, r)
        _store_block(t_ptr, base, t21, 2, 1, r)
        _store_block(t_ptr, base, t2, 2, 2, r)
        _store_block(t_ptr, base, zero, 2, 3, r)
        _store_block(t_ptr, base, t30, 3, 0, r)
        _store_block(t_ptr, base, t31, 3, 1, r)
        _store_block(t_ptr, base, t32, 3, 2, r)
        _store_block(t_ptr, base, t3, 3, 3, r)
        tl.store(gc_ptr + rows0 * sgc_t + h * sgc_h, g0, mask=ok0)
        tl.store(gc_ptr + rows1 * sgc_t + h * sgc_h, g1, mask=ok1)
        tl.store(gc_ptr + rows2 * sgc_t + h * sgc_h, g2, mask=ok2)
        tl.store(gc_ptr + rows3 * sgc_t + h * sgc_h, g3, mask=ok3)


@triton.jit
def _wu_kernel(
    k_ptr, v_ptr, beta_ptr, cu_ptr, idx_ptr, t_ptr, gc_ptr, w_ptr, u_ptr,
    num_chunks, hv_heads, group,
    sk_t, sk_h, sv_t, sv_h, sb_t, sb_h, sgc_t, sgc_h, sw_t, sw_h, su_t, su_h,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """w = T (beta exp(G) k) and u = T (beta v) of every chunk as whole 64-row products."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, 64)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    for item in range(pid, num_chunks * hv_heads, nprog):
        chunk = item // hv_heads
        h = item % hv_heads
        seq = tl.load(idx_ptr + 2 * chunk)
        start = tl.load(cu_ptr + seq) + tl.load(idx_ptr + 2 * chunk + 1) * 64
        rows = start + r
        ok = rows < tl.minimum(tl.load(cu_ptr + seq + 1), start + 64)
        t = tl.load(t_ptr + tl.cast(item, tl.int64) * 4096 + r[:, None] * 64 + r[None, :])
        b = _load_vec(beta_ptr, rows, ok, sb_t, h * sb_h)
        gc = tl.load(gc_ptr + rows * sgc_t + h * sgc_h, mask=ok, other=0.0)
        kk = _load_rows(k_ptr, rows, ok, ck, K, sk_t, (h // group) * sk_h)
        kk = kk * tl.where(ok, b * tl.exp(gc), 0.0)[:, None]
        _store_rows(w_ptr, tl.dot(t, kk, input_precision=PREC), rows, ok, ck, K, sw_t, h * sw_h)
        for v0 in range(0, V, BV):
            col = v0 + cv
            vv = _load_rows(v_ptr, rows, ok, col, V, sv_t, h * sv_h) * b[:, None]
            _store_rows(
                u_ptr, tl.dot(t, vv, input_precision=PREC), rows, ok, col, V, su_t, h * su_h
            )


@triton.jit
def _state_kernel(
    k_ptr, w_ptr, u_ptr, gc_ptr, hs_ptr, h0_ptr, ht_ptr, cu_ptr, off_ptr,
    num_seqs, hv_heads, group,
    sk_t, sk_h, sw_t, sw_h, su_t, su_h, sgc_t, sgc_h, sh_n, sh_h, sh_k,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
    OPD: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, 64)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    n_v = tl.cdiv(V, BV)
    for item in range(pid, num_seqs * hv_heads * n_v, nprog):
        seq = item // (hv_heads * n_v)
        h = (item // n_v) % hv_heads
        vcol = (item % n_v) * BV + cv
        kh = (h // group) * sk_h
        start = tl.load(cu_ptr + seq)
        end = tl.load(cu_ptr + seq + 1)
        chunk = tl.load(off_ptr + seq).to(tl.int64)
        smask = (ck < K)[:, None] & (vcol < V)[None, :]
        state_off = h * sh_h + ck[:, None] * sh_k + vcol[None, :]
        if HAS_H0:
            s = tl.load(h0_ptr + seq.to(tl.int64) * sh_n + state_off, mask=smask, other=0.0)
        else:
            s = tl.zeros((BK, BV), dtype=tl.float32)
        for c0 in range(start, end, 64):
            snap = hs_ptr + chunk * hv_heads * sh_h + state_off
            tl.store(snap, s.to(hs_ptr.dtype.element_ty), mask=smask)
            rows = c0 + r
            ok = rows < end
            w = _op(_load_rows(w_ptr, rows, ok, ck, K, sw_t, h * sw_h), OPD, EMULATE)
            u = _load_rows(u_ptr, rows, ok, vcol, V, su_t, h * su_h)
            v_new = _op(u - tl.dot(w, _op(s, OPD, EMULATE), input_precision=PREC), OPD, EMULATE)
            _store_rows(u_ptr, v_new, rows, ok, vcol, V, su_t, h * su_h)
            gc = tl.load(gc_ptr + rows * sgc_t + h * sgc_h, mask=ok, other=0.0)
            g_last = tl.sum(tl.where(rows == tl.minimum(c0 + 64, end) - 1, gc, 0.0), axis=0)
            kk = _load_rows(k_ptr, rows, ok, ck, K, sk_t, kh)
            kd = _op(kk * tl.where(ok, tl.exp(g_last - gc), 0.0)[:, None], OPD, EMULATE)
            s = s * tl.exp(g_last) + tl.dot(tl.trans(kd), v_new, input_precision=PREC)
            chunk += 1
        if STORE_HT:
            tl.store(ht_ptr + seq.to(tl.int64) * sh_n + state_off, s, mask=smask)


@triton.jit
def _output_kernel(
    q_ptr, k_ptr, u_ptr, gc_ptr, hs_ptr, o_ptr, cu_ptr, idx_ptr,
    num_chunks, hv_heads, group, scale,
    sq_t, sq_h, sk_t, sk_h, su_t, su_h, sgc_t, sgc_h, so_t, so_h, sh_h, sh_k,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    OPD: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    r = tl.arange(0, 64)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    causal = r[:, None] >= r[None, :]
    for item in range(pid, num_chunks * hv_heads, nprog):
        chunk = item // hv_heads
        h = item % hv_heads
        seq = tl.load(idx_ptr + 2 * chunk)
        start = tl.load(cu_ptr + seq) + tl.load(idx_ptr + 2 * chunk + 1) * 64
        rows = start + r
        ok = rows < tl.minimum(tl.load(cu_ptr + seq + 1), start + 64)
        kh = (h // group) * sk_h
        q = _load_rows(q_ptr, rows, ok, ck, K, sq_t, (h // group) * sq_h)
        kk = _load_rows(k_ptr, rows, ok, ck, K, sk_t, kh)
        gc = tl.load(gc_ptr + rows * sgc_t + h * sgc_h, mask=ok, other=0.0)
        p = tl.dot(_op(q, OPD, EMULATE), tl.trans(_op(kk, OPD, EMULATE)), input_precision=PREC)
        p = tl.where(causal, p * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0)
        p = _op(p, OPD, EMULATE)
        q = _op(q * tl.exp(gc)[:, None], OPD, EMULATE)
        base = chunk.to(tl.int64) * hv_heads * sh_h + h * sh_h
        for v0 in range(0, V, BV):
            col = v0 + cv
            hs = tl.load(
                hs_ptr + base + ck[:, None] * sh_k + col[None, :],
                mask=(ck < K)[:, None] & (col < V)[None, :],
                other=0.0,
            )
            hs = _op(hs.to(tl.float32), OPD, EMULATE)
            vn = _op(_load_rows(u_ptr, rows, ok, col, V, su_t, h * su_h), OPD, EMULATE)
            o = tl.dot(q, hs, input_precision=PREC) + tl.dot(p, vn, input_precision=PREC)
            _store_rows(o_ptr, o * scale, rows, ok, col, V, so_t, h * so_h)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def check_shapes(
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


def dense_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dimension densely."""
    return t if t.stride(-1) == 1 else t.contiguous()


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
    tokens, hk, hv, kdim, vdim = check_shapes(q, k, v, g, beta)
    q, k, v = dense_rows(q), dense_rows(k), dense_rows(v)
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
    dev = q.device
    low = LOW_PRECISION and q.element_size() == 2
    scratch = q.dtype if low else torch.float32
    w = torch.empty((tokens, hv, kdim), dtype=scratch, device=dev)
    u = torch.empty((tokens, hv, vdim), dtype=scratch, device=dev)
    operands = {
        "OPD": _TL_DTYPES[q.dtype] if low else tl.float32,
        "EMULATE": low and dev.type == "cpu",  # Triton's interpreter
    }
    gc = torch.empty((tokens, hv), dtype=torch.float32, device=dev)
    snap_dtype = q.dtype if q.element_size() == 2 else torch.float32
    hs = torch.empty((max(1, metadata.num_chunks), hv, kdim, vdim), dtype=snap_dtype, device=dev)
    bk = max(16, pow2_ceil(kdim))
    prec = dot_precision(dev)
    group = hv // hk

    def tile(limit: int) -> int:
        return max(16, min(limit, pow2_ceil(vdim)))

    if metadata.num_chunks and WY_SPLIT:
        t = torch.empty((metadata.num_chunks * hv, 64, 64), dtype=torch.float32, device=dev)
        _t_kernel[(grid_size(dev, metadata.num_chunks * hv),)](
            k, g, beta, cu_seqlens, metadata.indices, t, gc,
            metadata.num_chunks, hv, group,
            k.stride(0), k.stride(1), g.stride(0), g.stride(1), beta.stride(0), beta.stride(1),
            gc.stride(0), gc.stride(1),
            K=kdim, BK=bk, PREC=prec, SPREC="ieee", KDT=tl.float32, EMULATE=False,
            **T_LAUNCH,
        )  # fmt: skip
        _wu_kernel[(grid_size(dev, metadata.num_chunks * hv),)](
            k, v, beta, cu_seqlens, metadata.indices, t, gc, w, u,
            metadata.num_chunks, hv, group,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), beta.stride(0), beta.stride(1),
            gc.stride(0), gc.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
            K=kdim, V=vdim, BK=bk, BV=tile(WU_BV), PREC=prec, **WU_LAUNCH,
        )  # fmt: skip
    elif metadata.num_chunks:
        _wy_kernel[(grid_size(dev, metadata.num_chunks * hv),)](
            k, v, g, beta, cu_seqlens, metadata.indices, w, u, gc,
            metadata.num_chunks, hv, group,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), g.stride(1),
            beta.stride(0), beta.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
            gc.stride(0), gc.stride(1),
            K=kdim, V=vdim, BK=bk, BV=tile(WY_BV), PREC=prec, **operands,
            SPREC=LOW_PRECISION_SOLVE if low and dev.type == "cuda" else "ieee",
            KDT=operands["OPD"] if LOW_PRECISION_KKT else tl.float32, **WY_LAUNCH,
        )  # fmt: skip
    # Snapshots, initial and final states are all dense (.., Hv, K, V): one set of strides.
    h_strides = (hv * kdim * vdim, kdim * vdim, vdim)
    state_bv = tile(STATE_BV)
    # The sequential kernel runs one program per (sequence, head, value tile): with few
    # sequences, halve the tile rather than leave cores idle (H200, 1x8192: 0.76 against 0.85 ms).
    while (
        STATE_BV_ADAPT and state_bv > 16
        and 2 * num_seqs * hv * triton.cdiv(vdim, state_bv) <= core_count(dev)
    ):  # fmt: skip
        state_bv //= 2
    _state_kernel[(grid_size(dev, num_seqs * hv * triton.cdiv(vdim, state_bv)),)](
        k, w, u, gc, hs,
        initial_state if initial_state is not None else gc, final if final is not None else gc,
        cu_seqlens, metadata.offsets,
        num_seqs, hv, group,
        k.stride(0), k.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
        gc.stride(0), gc.stride(1), *h_strides,
        K=kdim, V=vdim, BK=bk, BV=state_bv,
        HAS_H0=initial_state is not None, STORE_HT=final is not None, PREC=prec,
        **operands, **STATE_LAUNCH,
    )  # fmt: skip
    if metadata.num_chunks:
        _output_kernel[(grid_size(dev, metadata.num_chunks * hv),)](
            q, k, u, gc, hs, o, cu_seqlens, metadata.indices,
            metadata.num_chunks, hv, group, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), u.stride(0), u.stride(1),
            gc.stride(0), gc.stride(1), o.stride(0), o.stride(1), *h_strides[1:],
            K=kdim, V=vdim, BK=bk, BV=tile(OUTPUT_BV), PREC=prec, **operands, **OUTPUT_LAUNCH,
        )  # fmt: skip
    return o, final
