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


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _conv_prefill_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, state_ptr, cu_ptr, idx_ptr, init_ptr,
    num_tokens, dim, batch,
    sx_t, sx_d, sw_d, sw_k, so_t, so_d, ss_n, ss_d, ss_k,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_d = tl.cdiv(dim, BLOCK_D)
    n_items = tl.cdiv(num_tokens, BLOCK_T) * n_d
    seq_offs = tl.arange(0, BLOCK_B)
    # cu_seqlens[1:], padded with a value no token reaches: a token's sequence is the number
    # of sequence ends at or before it.
    ends = tl.load(cu_ptr + 1 + seq_offs, mask=seq_offs < batch, other=num_tokens + 1)
    for item in range(pid, n_items, nprog):
        t0 = (item // n_d) * BLOCK_T
        d = (item % n_d) * BLOCK_D + tl.arange(0, BLOCK_D)
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < num_tokens
        d_ok = d < dim
        seq = tl.sum((ends[None, :] <= t[:, None]).to(tl.int32), axis=1)
        seq = tl.minimum(seq, batch - 1)
        start = tl.load(cu_ptr + seq, mask=t_ok, other=0)
        if HAS_BIAS:
            acc = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            acc = tl.broadcast_to(acc, (BLOCK_T, BLOCK_D))
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        xrow = x_ptr + t.to(tl.int64)[:, None] * sx_t + d[None, :] * sx_d
        for k in tl.static_range(WIDTH):
            shift = k - (WIDTH - 1)
            from_x = (t + shift - start >= 0) & t_ok  # inside this token's own sequence
            xv = tl.load(xrow + shift * sx_t, mask=from_x[:, None] & d_ok[None, :], other=0.0)
            wk = tl.load(w_ptr + d * sw_d + k * sw_k, mask=d_ok, other=0.0).to(tl.float32)
            acc += xv.to(tl.float32) * wk[None, :]
        if HAS_STATE:
            # Only tiles holding a sequence's first WIDTH-1 tokens reach into a cached state.
            near_start = tl.sum(((t - start < WIDTH - 1) & t_ok).to(tl.int32), axis=0) > 0
            if near_start:
                slot = tl.load(idx_ptr + seq, mask=t_ok, other=-1).to(tl.int64)
                has_init = tl.load(init_ptr + seq, mask=t_ok, other=0).to(tl.int32) != 0
                use_state = has_init & (slot >= 0) & t_ok
                for k in tl.static_range(WIDTH - 1):
                    pos = t + k - (WIDTH - 1) - start  # negative: index WIDTH-1+pos of the state
                    from_s = (pos < 0) & use_state
                    sv = tl.load(
                        state_ptr
                        + slot[:, None] * ss_n
                        + d[None, :] * ss_d
                        + (WIDTH - 1 + pos)[:, None] * ss_k,
                        mask=from_s[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    wk = tl.load(w_ptr + d * sw_d + k * sw_k, mask=d_ok, other=0.0).to(tl.float32)
                    acc += sv.to(tl.float32) * wk[None, :]
        if SILU:
            acc = _silu(acc)
        tl.store(
            out_ptr + t.to(tl.int64)[:, None] * so_t + d[None, :] * so_d,
            acc.to(out_ptr.dtype.element_ty),
            mask=t_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _conv_final_state_kernel(
    x_ptr, state_ptr, cu_ptr, idx_ptr, init_ptr,
    dim, batch,
    sx_t, sx_d, ss_n, ss_d, ss_k,
    WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_d = tl.cdiv(dim, BLOCK_D)
    k = tl.arange(0, BLOCK_K)
    k_ok = k < WIDTH - 1
    for item in range(pid, batch * n_d, nprog):
        seq = item // n_d
        d = (item % n_d) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        slot = tl.load(idx_ptr + seq).to(tl.int64)
        if slot >= 0:
            start = tl.load(cu_ptr + seq)
            length = tl.load(cu_ptr + seq + 1) - start
            pos = length - (WIDTH - 1) + k  # the last WIDTH-1 positions of the sequence
            xv = tl.load(
                x_ptr + (start + pos).to(tl.int64)[:, None] * sx_t + d[None, :] * sx_d,
                mask=((pos >= 0) & k_ok)[:, None] & d_ok[None, :],
                other=0.0,
            )
            # A sequence shorter than WIDTH-1 keeps part of its initial state (if it had one).
            use_init = tl.load(init_ptr + seq).to(tl.int32) + tl.zeros_like(k) != 0
            sv = tl.load(
                state_ptr + slot * ss_n + d[None, :] * ss_d + (WIDTH - 1 + pos)[:, None] * ss_k,
                mask=((pos < 0) & k_ok & use_init)[:, None] & d_ok[None, :],
                other=0.0,
            )
            xv = tl.where((pos >= 0)[:, None], xv, sv.to(xv.dtype))
            # Every load above precedes this store, so updating the state in place is safe.
            tl.store(
                state_ptr + slot * ss_n + d[None, :] * ss_d + k[:, None] * ss_k,
                xv.to(state_ptr.dtype.element_ty),
                mask=k_ok[:, None] & d_ok[None, :],
            )


PREFILL_TILE_CUDA = (32, 128)
"""(tokens, channels) of a prefill tile on NVIDIA GPUs: the best of a sweep on an H100
(2098 GB/s against 1620-1860 for 16 x 256, 8 x 256 and 32 x 256 in the same run)."""


def prefill_tiles(dim: int, device: torch.device) -> tuple[int, int]:
    """(tokens, channels) per prefill tile. NPU: 512 channels (256 below 512) and as many tokens
    as the 32 KB tile budget holds in fp32; CUDA: PREFILL_TILE_CUDA."""
    if device_type(device) == "cuda":
        block_t, block_d = PREFILL_TILE_CUDA
        return block_t, min(block_d, pow2_ceil(dim))
    block_d = min(channel_tile(dim, device), pow2_ceil(dim))
    return max(1, min(16, pow2_floor(tile_budget_bytes(device) // (block_d * 4)))), block_d


def _check_conv(weight: torch.Tensor, dim: int, bias: torch.Tensor | None) -> int:
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be (dim={dim}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if not 2 <= width <= MAX_WIDTH:
        raise ValueError(f"conv width must be 2..{MAX_WIDTH}, got {width}")
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"bias must be (dim={dim},), got {tuple(bias.shape)}")
    return width


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
    batch = cu_seqlens.numel() - 1
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if (conv_states is None) != (cache_indices is None):
        raise ValueError("conv_states and cache_indices go together")
    out = torch.empty_like(x) if out is None else out
    if num_tokens == 0 or batch <= 0:
        return out
    block_t, block_d = prefill_tiles(dim, x.device)
    items = triton.cdiv(num_tokens, block_t) * triton.cdiv(dim, block_d)
    has_state = conv_states is not None
    if has_state and has_initial_state is None:
        has_initial_state = torch.zeros(batch, dtype=torch.bool, device=x.device)
    dummy = cu_seqlens
    states = conv_states if has_state else x
    state_strides = conv_states.stride() if has_state else (0, 0, 0)
    _conv_prefill_kernel[(grid_size(x.device, items),)](
        x, weight, bias if bias is not None else weight, out, states,
        cu_seqlens, cache_indices if has_state else dummy,
        has_initial_state if has_state else dummy,
        num_tokens, dim, batch,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        *state_strides,
        WIDTH=width, HAS_BIAS=bias is not None, HAS_STATE=has_state,
        SILU=activation == "silu", BLOCK_T=block_t, BLOCK_D=block_d,
        BLOCK_B=pow2_ceil(batch),
        **PREFILL_LAUNCH,
    )  # fmt: skip
    if has_state:
        _conv_final_state_kernel[(grid_size(x.device, batch * triton.cdiv(dim, block_d)),)](
            x, conv_states, cu_seqlens, cache_indices, has_initial_state,
            dim, batch, x.stride(0), x.stride(1), *conv_states.stride(),
            WIDTH=width, BLOCK_D=block_d, BLOCK_K=pow2_ceil(width - 1),
        )  # fmt: skip
    return out


@triton.jit
def _conv_update_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, state_ptr, idx_ptr,
    batch, steps, dim,
    sx_b, sx_t, sx_d, sw_d, sw_k, so_b, so_t, so_d, ss_n, ss_d, ss_k,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_d = tl.cdiv(dim, BLOCK_D)
    for item in range(pid, batch * n_d, nprog):
        b = item // n_d
        d = (item % n_d) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < dim
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
            w0 = tl.load(w_ptr + d * sw_d, mask=d_ok, other=0.0).to(tl.float32)
            w1 = tl.load(w_ptr + d * sw_d + sw_k, mask=d_ok, other=0.0).to(tl.float32)
            w2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
            w3 = tl.zeros((BLOCK_D,), dtype=tl.float32)
            if WIDTH >= 3:
                w2 = tl.load(w_ptr + d * sw_d + 2 * sw_k, mask=d_ok, other=0.0).to(tl.float32)
            if WIDTH >= 4:
                w3 = tl.load(w_ptr + d * sw_d + 3 * sw_k, mask=d_ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
            else:
                bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for t in range(steps):
                xt = tl.load(
                    x_ptr + b.to(tl.int64) * sx_b + t * sx_t + d * sx_d, mask=d_ok, other=0.0
                ).to(tl.float32)
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
                    out_ptr + b.to(tl.int64) * so_b + t * so_t + d * so_d,
                    acc.to(out_ptr.dtype.element_ty),
                    mask=d_ok,
                )
            dt = state_ptr.dtype.element_ty
            tl.store(base, s0.to(dt), mask=d_ok)
            if WIDTH >= 3:
                tl.store(base + ss_k, s1.to(dt), mask=d_ok)
            if WIDTH >= 4:
                tl.store(base + 2 * ss_k, s2.to(dt), mask=d_ok)


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
    block_d = min(channel_tile(dim, x.device), pow2_ceil(dim))
    _conv_update_kernel[(grid_size(x.device, batch * triton.cdiv(dim, block_d)),)](
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
