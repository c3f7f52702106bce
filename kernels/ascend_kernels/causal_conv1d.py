"""Depthwise causal conv1d of hybrid linear-attention layers (Qwen3-Next, Qwen3.5).

Prefill: variable-length sequences packed along tokens (cu_seqlens), each optionally continuing
from a cached conv state, with the final states written back to the cache. Decode: one or more
new tokens per sequence against each sequence's cached state, updated in place.

Layouts: ``x`` is (tokens, dim) (decode: (batch, tokens_per_seq, dim)), ``weight`` (dim, width),
``conv_states`` (slots, dim, width - 1). Any strides are accepted. A cache index of -1 marks a
padding sequence: its state is neither read nor written (decode also leaves its output alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ascend_kernels.device import (
    channel_tile,
    device_type,
    grid_size,
    pow2_ceil,
    pow2_floor,
    tile_budget_bytes,
)

MAX_WIDTH = 4
PREFILL_LAUNCH = {"num_warps": 4}
UPDATE_LAUNCH = {"num_warps": 8}
"""Launch options for CUDA (triton-ascend ignores warps)."""
UPDATE_TILE_CUDA = 1024
"""Channels per decode-update program on NVIDIA GPUs (bench/kernel_tiles.py on an H100)."""


@triton.jit
def _silu(x):
    # Approximate division (a couple of ulp): IEEE division made SiLU a tenth of the prefill
    # kernel's time on an H100.
    return tl.fdiv(x, 1.0 + tl.exp(-x), ieee_rounding=False)


@triton.jit
def _weights(w_ptr, d, d_ok, sw_d, sw_k, WIDTH: tl.constexpr):
    # The conv taps of channels d, oldest first (unused ones zero).
    w_row = w_ptr + d * sw_d
    w0 = tl.load(w_row, mask=d_ok, other=0.0).to(tl.float32)
    w1 = tl.load(w_row + sw_k, mask=d_ok, other=0.0).to(tl.float32)
    w2 = tl.zeros_like(w0)
    w3 = tl.zeros_like(w0)
    if WIDTH >= 3:
        w2 = tl.load(w_row + 2 * sw_k, mask=d_ok, other=0.0).to(tl.float32)
    if WIDTH >= 4:
        w3 = tl.load(w_row + 3 * sw_k, mask=d_ok, other=0.0).to(tl.float32)
    return w0, w1, w2, w3


@triton.jit
def _tap(w0, w1, w2, w3, j: tl.constexpr):
    w = w3
    if j == 0:
        w = w0
    if j == 1:
        w = w1
    if j == 2:
        w = w2
    return w


@triton.jit
def _chunk_table(cu_ptr, batch, SKIP_FIRST: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_B: tl.constexpr):  # fmt: skip
    # Chunks are numbered sequence by sequence, each sequence starting a new chunk. With
    # SKIP_FIRST, every sequence's first chunk is left out (the state kernel computes those).
    offs = tl.arange(0, BLOCK_B)
    lo = tl.load(cu_ptr + offs, mask=offs < batch, other=0)
    hi = tl.load(cu_ptr + 1 + offs, mask=offs < batch, other=0)
    n_chunks = tl.where(offs < batch, tl.maximum(tl.cdiv(hi - lo, BLOCK_T), 1) - SKIP_FIRST, 0)
    chunk_end = tl.cumsum(n_chunks, axis=0)
    return lo, hi, n_chunks, chunk_end, tl.sum(n_chunks, axis=0)


@triton.jit
def _seq_chunk(chunk, lo, hi, n_chunks, chunk_end, SKIP_FIRST: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    # chunk -> (the chunk's first token, its sequence's start and end)
    seq = tl.sum((chunk_end <= chunk).to(tl.int32), axis=0)
    mine = tl.arange(0, BLOCK_B) == seq
    first = tl.sum(tl.where(mine, chunk_end - n_chunks, 0), axis=0)
    start = tl.sum(tl.where(mine, lo, 0), axis=0)
    end = tl.sum(tl.where(mine, hi, 0), axis=0)
    return start + (chunk - first + SKIP_FIRST) * BLOCK_T, start, end


@triton.jit
def _row_lanes(dim, BLOCK_D: tl.constexpr):
    # Programs form `lanes` rows of `group` channel tiles (row_grid sizes the launch): a program
    # takes channel tiles pid % group, pid % group + group, ... and, in each, the work items
    # lane, lane + lanes, ... with the tile's weights kept in registers.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_d = tl.cdiv(dim, BLOCK_D)
    group = tl.minimum(nprog, n_d)
    return pid % group, n_d, group, pid // group, nprog // group


@triton.jit
def _channel_tile(w_ptr, b_ptr, dt, dim, sw_d, sw_k,
                  WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    d = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    w0, w1, w2, w3 = _weights(w_ptr, d, d_ok, sw_d, sw_k, WIDTH)
    if HAS_BIAS:
        bias = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    return d, d_ok, w0, w1, w2, w3, bias


@triton.jit
def _conv_tile(
    x_ptr, t0, start, end, d, d_ok, w0, w1, w2, w3, bias, sx_t, sx_d,
    WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, WIDE: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    # Pre-activation outputs of tokens t0.. of one sequence from its own inputs only, and t
    # with its validity mask.
    t = t0 + tl.arange(0, BLOCK_T)
    t_ok = t < end
    if WIDE:
        t = t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, d.shape[0]), dtype=tl.float32) + bias[None, :]
    for j in tl.static_range(WIDTH):
        row = t + (j - (WIDTH - 1))
        from_x = (row >= start) & t_ok
        # Addresses built per tap, not kept as a pointer tile: fewer live registers.
        at = x_ptr + row[:, None] * sx_t + d[None, :] * sx_d
        if EVEN_D:
            xv = tl.load(at, mask=from_x[:, None], other=0.0)
        else:
            xv = tl.load(at, mask=from_x[:, None] & d_ok[None, :], other=0.0)
        acc += xv.to(tl.float32) * _tap(w0, w1, w2, w3, j)[None, :]
    return acc, t, t_ok


@triton.jit
def _store_tile(out_ptr, acc, t, t_ok, d, d_ok, so_t, so_d,
                SILU: tl.constexpr, EVEN_D: tl.constexpr):  # fmt: skip
    if SILU:
        acc = _silu(acc)
    at = out_ptr + t[:, None] * so_t + d[None, :] * so_d
    if EVEN_D:
        tl.store(at, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None])
    else:
        tl.store(at, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _store_window(at, s0, s1, s2, d_ok, ss_k, WIDTH: tl.constexpr):
    # A conv state's WIDTH-1 entries, oldest first, at `at` (entry stride ss_k).
    sdt = at.dtype.element_ty
    tl.store(at, s0.to(sdt), mask=d_ok)
    if WIDTH >= 3:
        tl.store(at + ss_k, s1.to(sdt), mask=d_ok)
    if WIDTH >= 4:
        tl.store(at + 2 * ss_k, s2.to(sdt), mask=d_ok)


@triton.jit
def _final_row(
    x_ptr, state_ptr, slot, use, start, end, d, d_ok, sx_t, sx_d, ss_n, ss_d, ss_k,
    k: tl.constexpr, WIDTH: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    # Entry k of a sequence's final state: its input at end-(WIDTH-1)+k, or, before the
    # sequence's start, entry WIDTH-1+pos of the old state (zero without one). Scalar
    # conditions are broadcast by hand: Triton's interpreter rejects scalar-and-vector masks.
    pos = end - start - (WIDTH - 1) + k
    pos_v = tl.zeros_like(d) + pos
    use_v = (tl.zeros_like(d) + use.to(tl.int32)) != 0
    row = start + pos
    if WIDE:
        row = row.to(tl.int64)
    xv = tl.load(x_ptr + row * sx_t + d * sx_d, mask=d_ok & (pos_v >= 0), other=0.0)
    sv = tl.load(
        state_ptr + slot * ss_n + d * ss_d + (WIDTH - 1 + pos) * ss_k,
        mask=d_ok & (pos_v < 0) & use_v,
        other=0.0,
    )
    return xv.to(tl.float32) + sv.to(tl.float32)


@triton.jit
def _conv_prefill_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, cu_ptr,
    dim, batch,
    sx_t, sx_d, sw_d, sw_k, so_t, so_d,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SKIP_FIRST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
    WIDE: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    # Each program walks its lane's token chunks (_row_lanes). No cached state is read here:
    # with states, sequences' first chunks are left to _conv_prefill_first_kernel (keeping that
    # path out of this kernel keeps its register count, and so its occupancy, where it is).
    first_dt, n_d, group, lane, lanes = _row_lanes(dim, BLOCK_D)
    lo, hi, n_chunks, chunk_end, total = _chunk_table(cu_ptr, batch, SKIP_FIRST, BLOCK_T,
                                                      BLOCK_B)  # fmt: skip
    for dt in range(first_dt, n_d, group):
        d, d_ok, w0, w1, w2, w3, bias = _channel_tile(w_ptr, b_ptr, dt, dim, sw_d, sw_k,
                                                      WIDTH, HAS_BIAS, BLOCK_D)  # fmt: skip
        for chunk in range(lane, total, lanes):
            t0, start, end = _seq_chunk(chunk, lo, hi, n_chunks, chunk_end, SKIP_FIRST,
                                        BLOCK_T, BLOCK_B)  # fmt: skip
            acc, t, t_ok = _conv_tile(x_ptr, t0, start, end, d, d_ok, w0, w1, w2, w3, bias,
                                      sx_t, sx_d, WIDTH, BLOCK_T, WIDE, EVEN_D)  # fmt: skip
            _store_tile(out_ptr, acc, t, t_ok, d, d_ok, so_t, so_d, SILU, EVEN_D)


@triton.jit
def _conv_prefill_first_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, state_ptr, cu_ptr, idx_ptr, init_ptr,
    dim, batch,
    sx_t, sx_d, sw_d, sw_k, so_t, so_d, ss_n, ss_d, ss_k,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    # Each sequence's first chunk, continuing from its cached state, and its final state. Only
    # this chunk reads the state (BLOCK_T >= WIDTH-1), so the same program writes the final
    # state after a barrier: no other program reads the slot.
    first_dt, n_d, group, lane, lanes = _row_lanes(dim, BLOCK_D)
    for dt in range(first_dt, n_d, group):
        d, d_ok, w0, w1, w2, w3, bias = _channel_tile(w_ptr, b_ptr, dt, dim, sw_d, sw_k,
                                                      WIDTH, HAS_BIAS, BLOCK_D)  # fmt: skip
        for seq in range(lane, batch, lanes):
            start = tl.load(cu_ptr + seq)
            end = tl.load(cu_ptr + seq + 1)
            acc, t, t_ok = _conv_tile(x_ptr, start, start, end, d, d_ok, w0, w1, w2, w3, bias,
                                      sx_t, sx_d, WIDTH, BLOCK_T, WIDE, EVEN_D)  # fmt: skip
            slot = tl.load(idx_ptr + seq).to(tl.int64)
            use = (tl.load(init_ptr + seq).to(tl.int32) != 0) & (slot >= 0)
            if use:
                # Token p < WIDTH-1 adds w_j * state[p + j] for the taps j with p + j < WIDTH-1.
                base = state_ptr + slot * ss_n + d * ss_d
                r = tl.arange(0, BLOCK_T)[:, None]
                for p in tl.static_range(WIDTH - 1):
                    extra = tl.zeros((BLOCK_D,), dtype=tl.float32)
                    for j in tl.static_range(WIDTH - 1 - p):
                        sv = tl.load(base + (p + j) * ss_k, mask=d_ok, other=0.0)
                        extra += _tap(w0, w1, w2, w3, j) * sv.to(tl.float32)
                    acc += tl.where(r == p, extra[None, :], 0.0)
            _store_tile(out_ptr, acc, t, t_ok, d, d_ok, so_t, so_d, SILU, EVEN_D)
            f0 = _final_row(x_ptr, state_ptr, slot, use, start, end, d, d_ok,
                            sx_t, sx_d, ss_n, ss_d, ss_k, 0, WIDTH, WIDE)  # fmt: skip
            f1 = f0
            f2 = f0
            if WIDTH >= 3:
                f1 = _final_row(x_ptr, state_ptr, slot, use, start, end, d, d_ok,
                                sx_t, sx_d, ss_n, ss_d, ss_k, 1, WIDTH, WIDE)  # fmt: skip
            if WIDTH >= 4:
                f2 = _final_row(x_ptr, state_ptr, slot, use, start, end, d, d_ok,
                                sx_t, sx_d, ss_n, ss_d, ss_k, 2, WIDTH, WIDE)  # fmt: skip
            tl.debug_barrier()  # every warp has read the old state
            if slot >= 0:
                _store_window(state_ptr + slot * ss_n + d * ss_d, f0, f1, f2, d_ok, ss_k, WIDTH)


PREFILL_TILE_CUDA = (16, 256)
"""(tokens, channels) of a prefill tile on NVIDIA GPUs: the best of a sweep on an H100
(bench/kernel_tiles.py)."""


def prefill_tiles(dim: int, device: torch.device) -> tuple[int, int]:
    """(tokens, channels) per prefill tile. NPU: 512 channels (256 below 512) and as many tokens
    as the 32 KB tile budget holds in fp32; CUDA: PREFILL_TILE_CUDA. At least MAX_WIDTH - 1
    tokens, so a sequence's cached state is read by its first chunk only."""
    if device_type(device) == "cuda":
        block_t, block_d = PREFILL_TILE_CUDA
        return block_t, min(block_d, pow2_ceil(dim))
    block_d = min(channel_tile(dim, device), pow2_ceil(dim))
    budget_t = pow2_floor(tile_budget_bytes(device) // (block_d * 4))
    return max(pow2_ceil(MAX_WIDTH - 1), min(16, budget_t)), block_d


def row_grid(device: torch.device, n_d: int, rows: int) -> int:
    """Programs for `rows` x `n_d` channel tiles: whole rows of `n_d` programs (the kernels
    assign channel tiles by pid % n_d), or fewer than one row on small devices."""
    cap = grid_size(device, n_d * rows)
    return cap if cap < n_d else (cap // n_d) * n_d


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset of any tensor (its strides included) can pass int32."""
    return any(
        sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)) >= 2**31 - 1
        for t in tensors
        if t.numel()
    )


def _check_conv(weight: torch.Tensor, dim: int, bias: torch.Tensor | None) -> int:
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be (dim={dim}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if not 2 <= width <= MAX_WIDTH:
        raise ValueError(f"conv width must be 2..{MAX_WIDTH}, got {width}")
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"bias must be (dim={dim},), got {tuple(bias.shape)}")
    return width


_ZERO_BIAS: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}


def _bias_or_zeros(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """The bias, or a cached zero bias. Measured on an H200 (Triton 3.6): the prefill kernel
    compiled without a bias ran 18-27% slower than with one (the zero-initialised accumulator
    changes how Triton schedules the loads); loading zeros costs nothing measurable. The
    update kernel is the other way round (10% faster without), so it keeps HAS_BIAS=False."""
    if bias is not None:
        return bias
    key = (str(weight.device), weight.shape[0], weight.dtype)
    zeros = _ZERO_BIAS.get(key)
    if zeros is None:
        zeros = _ZERO_BIAS[key] = torch.zeros(key[1], dtype=weight.dtype, device=weight.device)
    return zeros


def causal_conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    conv_states: torch.Tensor | None = None,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv over packed sequences; returns (tokens, dim).

    With ``conv_states`` and ``cache_indices``, sequences whose ``has_initial_state`` is set
    continue from their cached state, and every sequence's last ``width - 1`` inputs are
    written back to its slot.
    """
    num_tokens, dim = x.shape
    width = _check_conv(weight, dim, bias)
    bias = _bias_or_zeros(bias, weight)
    batch = cu_seqlens.numel() - 1
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if (conv_states is None) != (cache_indices is None):
        raise ValueError("conv_states and cache_indices go together")
    out = torch.empty_like(x) if out is None else out
    if num_tokens == 0 or batch <= 0:
        return out
    block_t, block_d = prefill_tiles(dim, x.device)
    has_state = conv_states is not None
    if has_state and has_initial_state is None:
        has_initial_state = torch.zeros(batch, dtype=torch.bool, device=x.device)
    n_d = triton.cdiv(dim, block_d)
    common = {
        "WIDTH": width, "HAS_BIAS": bias is not None, "SILU": activation == "silu",
        "BLOCK_T": block_t, "BLOCK_D": block_d, "EVEN_D": dim % block_d == 0,
        "WIDE": _needs_int64(x, out), **PREFILL_LAUNCH,
    }  # fmt: skip
    strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
               out.stride(0), out.stride(1))  # fmt: skip
    b_arg = bias if bias is not None else weight
    # An upper bound of the chunk count, without reading cu_seqlens on the host (no sync).
    max_chunks = triton.cdiv(num_tokens, block_t) + batch
    _conv_prefill_kernel[(row_grid(x.device, n_d, max_chunks),)](
        x, weight, b_arg, out, cu_seqlens, dim, batch, *strides,
        SKIP_FIRST=int(has_state), BLOCK_B=pow2_ceil(batch), **common,
    )  # fmt: skip
    if has_state:
        _conv_prefill_first_kernel[(row_grid(x.device, n_d, batch),)](
            x, weight, b_arg, out, conv_states, cu_seqlens, cache_indices, has_initial_state,
            dim, batch, *strides, *conv_states.stride(), **common,
        )  # fmt: skip
    return out


@triton.jit
def _conv_update_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, state_ptr, idx_ptr,
    batch, steps, dim,
    sx_b, sx_t, sx_d, sw_d, sw_k, so_b, so_t, so_d, ss_n, ss_d, ss_k,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Each program walks its lane's sequences (_row_lanes).
    first_dt, n_d, group, lane, lanes = _row_lanes(dim, BLOCK_D)
    for dt in range(first_dt, n_d, group):
        d, d_ok, w0, w1, w2, w3, bias = _channel_tile(w_ptr, b_ptr, dt, dim, sw_d, sw_k,
                                                      WIDTH, HAS_BIAS, BLOCK_D)  # fmt: skip
        for b in range(lane, batch, lanes):
            slot = tl.load(idx_ptr + b).to(tl.int64)
            if slot >= 0:
                base = state_ptr + slot * ss_n + d * ss_d
                # The window's WIDTH-1 cached inputs, oldest first; unused ones stay zero.
                s0 = tl.load(base, mask=d_ok, other=0.0).to(tl.float32)
                s1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
                s2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
                if WIDTH >= 3:
                    s1 = tl.load(base + ss_k, mask=d_ok, other=0.0).to(tl.float32)
                if WIDTH >= 4:
                    s2 = tl.load(base + 2 * ss_k, mask=d_ok, other=0.0).to(tl.float32)
                for t in range(steps):
                    x_at = x_ptr + tl.cast(b, tl.int64) * sx_b + t * sx_t
                    xt = tl.load(x_at + d * sx_d, mask=d_ok, other=0.0).to(tl.float32)
                    if WIDTH == 2:
                        acc = bias + w0 * s0 + w1 * xt
                        s0 = xt
                    elif WIDTH == 3:
                        acc = bias + w0 * s0 + w1 * s1 + w2 * xt
                        s0 = s1
                        s1 = xt
                    else:
                        acc = bias + w0 * s0 + w1 * s1 + w2 * s2 + w3 * xt
                        s0 = s1
                        s1 = s2
                        s2 = xt
                    if SILU:
                        acc = _silu(acc)
                    tl.store(
                        out_ptr + tl.cast(b, tl.int64) * so_b + t * so_t + d * so_d,
                        acc.to(out_ptr.dtype.element_ty),
                        mask=d_ok,
                    )
                _store_window(base, s0, s1, s2, d_ok, ss_k, WIDTH)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_states: torch.Tensor,
    weight: torch.Tensor,
    cache_indices: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode step: x is (batch, dim) or (batch, tokens_per_seq, dim) for speculative tokens.

    Each sequence's tokens are convolved in order against its cached state
    (``conv_states[cache_indices[b]]``), which is then advanced in place.
    """
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x
    batch, steps, dim = x3.shape
    width = _check_conv(weight, dim, bias)
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if conv_states.dim() != 3 or conv_states.shape[1:] != (dim, width - 1):
        raise ValueError(
            f"conv_states must be (slots, dim={dim}, width-1={width - 1}), "
            f"got {tuple(conv_states.shape)}"
        )
    if cache_indices.shape != (batch,):
        raise ValueError(
            f"cache_indices must be (batch={batch},), got {tuple(cache_indices.shape)}"
        )
    out3 = torch.empty_like(x3) if out is None else (out.unsqueeze(1) if squeeze else out)
    if batch == 0 or steps == 0:
        return out3.squeeze(1) if squeeze else out3
    block_d = min(
        UPDATE_TILE_CUDA if x.device.type == "cuda" else channel_tile(dim, x.device), pow2_ceil(dim)
    )
    _conv_update_kernel[(row_grid(x.device, triton.cdiv(dim, block_d), batch),)](
        x3, weight, bias if bias is not None else weight, out3, conv_states, cache_indices,
        batch, steps, dim, *x3.stride(), weight.stride(0), weight.stride(1), *out3.stride(),
        *conv_states.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=activation == "silu", BLOCK_D=block_d,
        **UPDATE_LAUNCH,
    )  # fmt: skip
    return out3.squeeze(1) if squeeze else out3


# --- torch references ------------------------------------------------------------------------


def _conv_one(
    xs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial: torch.Tensor,
    activation: str | None,
) -> torch.Tensor:
    """(len, dim) after an initial (dim, width-1) history, computed with F.conv1d in fp32."""
    dim = weight.shape[0]
    if xs.shape[0] == 0:
        return xs.float()
    seq = torch.cat([initial.float(), xs.float().t()], dim=1)  # (dim, width-1+len)
    y = F.conv1d(
        seq.unsqueeze(0),
        weight.float().unsqueeze(1),
        bias.float() if bias is not None else None,
        groups=dim,
    )[0]
    if activation == "silu":
        y = F.silu(y)
    return y.t()


def causal_conv1d_prefill_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    conv_states: torch.Tensor | None = None,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Reference of causal_conv1d_prefill, one sequence at a time (updates conv_states too)."""
    dim, width = weight.shape
    out = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    for s in range(len(bounds) - 1):
        xs = x[bounds[s] : bounds[s + 1]]
        slot = int(cache_indices[s]) if cache_indices is not None else -1
        initial = torch.zeros(dim, width - 1, device=x.device)
        if (
            conv_states is not None
            and slot >= 0
            and has_initial_state is not None
            and bool(has_initial_state[s])
        ):
            initial = conv_states[slot].float()
        out[bounds[s] : bounds[s + 1]] = _conv_one(xs, weight, bias, initial, activation).to(
            x.dtype
        )
        if conv_states is not None and slot >= 0:
            history = torch.cat([initial, xs.float().t()], dim=1)
            conv_states[slot] = history[:, -(width - 1) :].to(conv_states.dtype)
    return out


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_states: torch.Tensor,
    weight: torch.Tensor,
    cache_indices: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Reference of causal_conv1d_update (updates conv_states; padding rows come back zero)."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x
    width = weight.shape[1]
    out = torch.zeros_like(x3)
    for b in range(x3.shape[0]):
        slot = int(cache_indices[b])
        if slot < 0:
            continue
        initial = conv_states[slot].float()
        out[b] = _conv_one(x3[b], weight, bias, initial, activation).to(x.dtype)
        history = torch.cat([initial, x3[b].float().t()], dim=1)
        conv_states[slot] = history[:, -(width - 1) :].to(conv_states.dtype)
    return out.squeeze(1) if squeeze else out
