"""Copy a list of (src, dst) blocks between two paged caches.

A cache is any tensor whose first dimension is the block index: a per-layer cache
(blocks, block_size, heads, head_size), a cross-layer buffer (blocks, layers, block_size, ...),
or a strided per-layer view of one. One launch moves every pair; the block's contents are
described as ``segments`` contiguous runs at a fixed stride, so a cross-layer block is one run
and a per-layer view of a cross-layer buffer is one run per block as well.

Device to device runs the Triton kernel. Host to device and device to host go through the
same kernel on CUDA when the host side is pinned (the GPU reads or writes host memory directly
over unified addressing); elsewhere (NPU, pageable memory, host to host outside Triton's
interpreter) they fall back to one ``copy_(non_blocking=True)`` per run of consecutive blocks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ascend_kernels.device import grid_size, pow2_ceil, pow2_floor, tile_budget_bytes


@triton.jit
def _copy_blocks_kernel(
    src_table, dst_table, carrier_ptr, src_ids_ptr, dst_ids_ptr,
    num_layers, num_pairs, segments, seg_len, src_block_stride, src_seg_stride,
    dst_block_stride, dst_seg_stride,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    # Each layer's cache is reached through a table of base addresses, so separate per-layer
    # tensors move in one launch like a single cross-layer buffer (one "layer").
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ptr_type = tl.pointer_type(carrier_ptr.dtype.element_ty)
    chunks = tl.cdiv(seg_len, BLOCK)
    per_pair = segments * chunks
    per_layer = num_pairs * per_pair
    offs = tl.arange(0, BLOCK)
    for item in range(pid, num_layers * per_layer, nprog):
        layer = item // per_layer
        rest = item % per_layer
        pair = rest // per_pair
        rest = rest % per_pair
        seg = rest // chunks
        start = (rest % chunks) * BLOCK
        src_base = tl.load(src_table + layer).to(ptr_type)
        dst_base = tl.load(dst_table + layer).to(ptr_type)
        if ALIGNED:  # addresses from a table carry no alignment; vector loads need it stated
            src_base = tl.multiple_of(src_base, 16)
            dst_base = tl.multiple_of(dst_base, 16)
        s = tl.load(src_ids_ptr + pair).to(tl.int64)
        d = tl.load(dst_ids_ptr + pair).to(tl.int64)
        i = start + offs
        mask = i < seg_len
        vals = tl.load(src_base + s * src_block_stride + seg * src_seg_stride + i, mask=mask)
        tl.store(dst_base + d * dst_block_stride + seg * dst_seg_stride + i, vals, mask=mask)


def block_segments(cache: torch.Tensor) -> tuple[int, int, int]:
    """(segments, segment length, segment stride) of one block of `cache`, in elements.

    The dimensions after the first are collapsed; at most one strided level over a contiguous
    run is supported (what every per-layer or cross-layer layout gives).
    """
    dims = [
        (size, stride)
        for size, stride in zip(cache.shape[1:], cache.stride()[1:], strict=True)
        if size != 1
    ]
    run, expected = 1, 1
    while dims and dims[-1][1] == expected:
        size, _ = dims.pop()
        run *= size
        expected = run
    if not dims:
        return 1, run, run
    outer = 1
    seg_stride = dims[-1][1]
    for size, stride in reversed(dims):
        if stride != seg_stride * outer:
            raise ValueError(
                f"cache with shape {tuple(cache.shape)} and strides {cache.stride()} has more than "
                "one strided level inside a block; copy its contiguous parent instead"
            )
        outer *= size
    return outer, run, seg_stride


def _kernel_can_reach(t: torch.Tensor, device: torch.device) -> bool:
    if t.device == device:
        return True
    return t.device.type == "cpu" and device.type == "cuda" and t.is_pinned()


def copy_blocks(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for every i (ids are int32/int64, any device)."""
    copy_blocks_layers([src], [dst], src_ids, dst_ids)


def copy_blocks_layers(
    srcs: list[torch.Tensor],
    dsts: list[torch.Tensor],
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
) -> None:
    """The same block pairs copied in every layer (srcs[l] -> dsts[l]), in one launch.

    Every layer's cache must have the same shape, dtype and strides on each side (vLLM's
    per-layer caches do), so one table of base addresses describes them all.
    """
    if not srcs or len(srcs) != len(dsts):
        raise ValueError(f"need one destination per source cache, got {len(srcs)} and {len(dsts)}")
    src, dst = srcs[0], dsts[0]
    for name, group in (("source", srcs), ("destination", dsts)):
        first = group[0]
        for t in group[1:]:
            if (t.shape, t.stride(), t.dtype, t.device) != (
                first.shape,
                first.stride(),
                first.dtype,
                first.device,
            ):
                raise ValueError(
                    f"every {name} cache must share shape, strides, dtype and device: "
                    f"{tuple(t.shape)} {t.stride()} {t.dtype} "
                    f"vs {tuple(first.shape)} {first.stride()} {first.dtype}"
                )
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(
            f"caches differ: src {tuple(src.shape)} {src.dtype} "
            f"vs dst {tuple(dst.shape)} {dst.dtype}"
        )
    if src_ids.shape != dst_ids.shape or src_ids.dim() != 1:
        raise ValueError(
            "src_ids and dst_ids must be equal 1-D, "
            f"got {tuple(src_ids.shape)} and {tuple(dst_ids.shape)}"
        )
    pairs = src_ids.numel()
    if pairs == 0:
        return
    run_on = dst.device if dst.device.type != "cpu" else src.device
    host_only = run_on.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
    if host_only or not (_kernel_can_reach(src, run_on) and _kernel_can_reach(dst, run_on)):
        for s_cache, d_cache in zip(srcs, dsts, strict=True):
            copy_block_runs(s_cache, d_cache, src_ids, dst_ids)
        return
    segs, seg_len, src_seg_stride = block_segments(src)
    dst_segs, dst_len, dst_seg_stride = block_segments(dst)
    if (segs, seg_len) != (dst_segs, dst_len):
        raise ValueError(f"block layouts differ: {segs}x{seg_len} vs {dst_segs}x{dst_len} elements")
    block = min(pow2_ceil(seg_len), pow2_floor(tile_budget_bytes(run_on) // src.element_size()))
    src_ids = src_ids.to(run_on, non_blocking=True)
    dst_ids = dst_ids.to(run_on, non_blocking=True)
    items = len(srcs) * pairs * segs * triton.cdiv(seg_len, block)
    _copy_blocks_kernel[(grid_size(run_on, items),)](
        _address_table(srcs, run_on), _address_table(dsts, run_on), src, src_ids, dst_ids,
        len(srcs), pairs, segs, seg_len,
        src.stride(0), src_seg_stride, dst.stride(0), dst_seg_stride,
        BLOCK=block, ALIGNED=all(t.data_ptr() % 16 == 0 for t in (*srcs, *dsts)),
    )  # fmt: skip


_TABLES: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}


def _address_table(caches: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Base addresses of `caches` as an int64 tensor on `device`, kept per set of caches (a
    step copies between the same caches every time)."""
    key = (str(device), tuple(t.data_ptr() for t in caches))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 64:
            _TABLES.clear()
        table = torch.tensor(key[1], dtype=torch.int64).to(device)
        _TABLES[key] = table
    return table


def consecutive_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) runs where both sides advance by one block."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_block_runs(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    """dst[dst_ids] = src[src_ids] as one DMA copy per run of consecutive blocks (the path
    without the kernel: NPU, pageable host memory)."""
    for s, d, n in consecutive_runs(src_ids.tolist(), dst_ids.tolist()):
        dst[d : d + n].copy_(src[s : s + n], non_blocking=True)


def copy_blocks_ref(
    src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    """Reference: advanced indexing through the caches' own views."""
    dst[dst_ids.long().to(dst.device)] = src[src_ids.long().to(src.device)].to(dst.device)
