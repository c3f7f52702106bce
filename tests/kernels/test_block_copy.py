"""Block copies between paged caches in per-layer, cross-layer and strided-view layouts."""

from __future__ import annotations

import pytest
import torch

from ascend_kernels.block_copy import (
    block_segments,
    consecutive_runs,
    copy_block_runs,
    copy_blocks,
    copy_blocks_layers,
    copy_blocks_ref,
)

PAIRS = ([1, 2, 3, 9, 0], [0, 5, 6, 11, 2])


def ids(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(PAIRS[0], device=device), torch.tensor(PAIRS[1], device=device)


@pytest.mark.parametrize(
    "shape",
    [(4, 2, 8), (3, 4, 2, 5), (60, 8, 1, 16)],  # per-layer block; cross-layer block (layers first)
)
def test_contiguous_caches(device, shape):
    src = torch.randn(10, *shape, device=device)
    dst = torch.zeros(12, *shape, device=device)
    ref = dst.clone()
    copy_blocks(src, dst, *ids(device))
    copy_blocks_ref(src, ref, *ids(device))
    assert torch.equal(dst, ref)


def test_per_layer_views_of_cross_layer_buffers(device):
    layers = 3
    src = torch.randn(10, layers, 4, 2, 5, device=device)
    dst = torch.zeros(12, layers, 4, 2, 5, device=device)
    copy_blocks(src[:, 1], dst[:, 1], *ids(device))
    ref = torch.zeros_like(dst)
    copy_blocks_ref(src[:, 1], ref[:, 1], *ids(device))
    assert torch.equal(dst, ref)
    assert torch.count_nonzero(dst[:, 0]) == 0 and torch.count_nonzero(dst[:, 2]) == 0


def test_strided_segments_inside_a_block(device):
    """Views of a (blocks, 2, layers, tokens, dim) buffer: contiguous, or one strided level."""
    buf = torch.randn(10, 2, 3, 4, 6, device=device)
    view = buf[:, 0, :, :, :]  # contiguous inside
    assert block_segments(view) == (1, 3 * 4 * 6, 3 * 4 * 6)
    strided = buf[:, :, 1]  # K and V of layer 1: 2 runs of 24 elements, 72 apart
    assert block_segments(strided) == (2, 24, 72)
    dst = torch.zeros(12, 2, 3, 4, 6, device=device)
    ref = dst.clone()
    copy_blocks(strided, dst[:, :, 1], *ids(device))
    copy_blocks_ref(strided, ref[:, :, 1], *ids(device))
    assert torch.equal(dst, ref)


def test_separate_per_layer_caches_in_one_call(device):
    srcs = [torch.randn(10, 4, 2, 5, device=device) for _ in range(3)]
    dsts = [torch.zeros(12, 4, 2, 5, device=device) for _ in range(3)]
    copy_blocks_layers(srcs, dsts, *ids(device))
    for s_cache, d_cache in zip(srcs, dsts, strict=True):
        ref = torch.zeros_like(d_cache)
        copy_blocks_ref(s_cache, ref, *ids(device))
        assert torch.equal(d_cache, ref)


def test_per_layer_caches_must_match(device):
    srcs = [torch.randn(10, 4, 8, device=device), torch.randn(10, 4, 9, device=device)]
    dsts = [torch.zeros(12, 4, 8, device=device), torch.zeros(12, 4, 8, device=device)]
    with pytest.raises(ValueError, match="every source cache must share shape"):
        copy_blocks_layers(srcs, dsts, *ids(device))
    with pytest.raises(ValueError, match="one destination per source"):
        copy_blocks_layers(srcs, dsts[:1], *ids(device))


def test_layouts_it_cannot_describe_are_refused():
    t = torch.zeros(4, 3, 5, 7).permute(0, 2, 1, 3)[:, :, 1:]
    with pytest.raises(ValueError, match="more than one strided level"):
        block_segments(t)


def test_no_pairs_and_mismatched_caches(device):
    src = torch.randn(4, 8, device=device)
    dst = torch.zeros(4, 8, device=device)
    copy_blocks(src, dst, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    assert torch.count_nonzero(dst) == 0
    with pytest.raises(ValueError, match="caches differ"):
        copy_blocks(src, torch.zeros(4, 9, device=device), *ids("cpu"))


def test_runs_fallback(device):
    assert consecutive_runs([1, 2, 3, 9, 10], [0, 1, 2, 4, 6]) == [(1, 0, 3), (9, 4, 1), (10, 6, 1)]
    src = torch.randn(10, 3, 4)
    dst = torch.zeros(12, 3, 4)
    ref = dst.clone()
    copy_block_runs(src, dst, *ids("cpu"))
    copy_blocks_ref(src, ref, *ids("cpu"))
    assert torch.equal(dst, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs a CUDA device")
def test_device_to_pinned_host_and_back():
    src = torch.randn(10, 3, 4, 2, 8, device="cuda")
    host = torch.zeros(12, 3, 4, 2, 8).pin_memory()
    copy_blocks(src, host, *ids("cuda"))
    torch.cuda.synchronize()
    ref = torch.zeros(12, 3, 4, 2, 8)
    copy_blocks_ref(src.cpu(), ref, *ids("cpu"))
    assert torch.equal(host, ref)
    back = torch.zeros(12, 3, 4, 2, 8, device="cuda")
    copy_blocks(host, back, *ids("cuda")[::-1])  # dst ids now index the source
    torch.cuda.synchronize()
    ref_back = torch.zeros(12, 3, 4, 2, 8)
    copy_blocks_ref(ref, ref_back, *ids("cpu")[::-1])
    assert torch.equal(back.cpu(), ref_back)


def test_unaligned_caches(device):
    """A cache starting one element into its storage (no 16-byte alignment) still copies."""
    storage = torch.randn(10 * 4 * 8 + 1, device=device)
    src = storage[1:].view(10, 4, 8)
    assert src.data_ptr() % 16 != 0
    dst = torch.zeros(12, 4, 8, device=device)
    ref = dst.clone()
    copy_blocks(src, dst, *ids(device))
    copy_blocks_ref(src, ref, *ids(device))
    assert torch.equal(dst, ref)
