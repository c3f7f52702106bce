"""MoE permute/unpermute and the HCCL buffer formula."""

from __future__ import annotations

import pytest
import torch

from ascend_kernels import hccl
from ascend_kernels.moe_permute import (
    SEGMENT_ALIGN_BYTES,
    align_rows,
    moe_permute,
    moe_permute_ref,
    moe_unpermute,
    moe_unpermute_ref,
)


def routing(tokens: int, top_k: int, span: int, offset: int, device: str) -> torch.Tensor:
    """Distinct ids per token drawn from [offset, offset + span) (ids outside the local range
    stand for experts on other ranks)."""
    rows = [torch.randperm(span)[:top_k] + offset for _ in range(tokens)]
    return (torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.long)).to(device)


@pytest.mark.parametrize(
    ("tokens", "hidden", "top_k", "experts", "dtype"),
    [
        (13, 100, 3, 5, torch.float32),
        (1, 64, 1, 1, torch.float32),
        (40, 700, 8, 16, torch.bfloat16),
    ],
)
def test_permute_groups_by_expert_with_aligned_segments(
    device, tokens, hidden, top_k, experts, dtype
):
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    ids = routing(tokens, top_k, experts + 2, -1, device)  # -1 and `experts` are not local
    p = moe_permute(x, ids, experts)
    want = moe_permute_ref(x, ids, experts)
    for e in range(experts):
        start, count = int(p.offsets[e]), int(p.counts[e])
        assert torch.equal(p.rows[start : start + count], want[e]), f"expert {e}"
        assert start * hidden * x.element_size() % SEGMENT_ALIGN_BYTES == 0
        assert int(p.offsets[e + 1]) >= start + count
    local = (ids >= 0) & (ids < experts)
    assert int(p.counts.sum()) == int(local.sum())
    assert torch.equal(p.row_of < 0, ~local)


def test_unpermute_combines_with_weights(device):
    tokens, hidden, top_k, experts = 21, 300, 4, 6
    x = torch.randn(tokens, hidden, device=device)
    ids = routing(tokens, top_k, experts + 2, 0, device)
    weights = torch.rand(tokens, top_k, device=device)
    p = moe_permute(x, ids, experts)
    expert_out = p.rows * 3.0  # a stand-in expert: row-wise, so it can be checked per token
    got = moe_unpermute(expert_out, p.row_of, weights)
    per_choice = torch.where((p.row_of >= 0)[..., None], expert_out[p.row_of.clamp(min=0)], 0.0)
    want = moe_unpermute_ref(per_choice, ids, weights, experts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    local = ((ids >= 0) & (ids < experts)).float()
    torch.testing.assert_close(
        got, 3.0 * x * (weights * local).sum(1, keepdim=True), rtol=1e-5, atol=1e-5
    )


def test_empty_batch(device):
    x = torch.empty(0, 64, device=device)
    p = moe_permute(x, torch.empty(0, 2, dtype=torch.long, device=device), 4)
    assert p.counts.tolist() == [0, 0, 0, 0] and p.row_of.shape == (0, 2)
    assert moe_unpermute(p.rows, p.row_of, torch.empty(0, 2, device=device)).shape == (0, 64)


def test_alignment_unit():
    assert align_rows(4096, 2) == 1  # 8 KiB rows are already aligned
    assert align_rows(100, 4) == 32  # 400-byte rows: 32 rows = 12800 bytes = 25 x 512
    assert align_rows(7, 1) == 512


def test_hccl_fused_mc2_formula():
    # Qwen3-235B: hidden 4096, top-8; 1024 tokens need 1024*8*4096*3 B = 96 MiB + 10 MB.
    assert hccl.fused_mc2_required_mb(1024, 8, 4096) == 106
    assert hccl.fused_mc2_max_tokens(106, 8, 4096) == 1024
    assert hccl.fused_mc2_max_tokens(hccl.HCCL_DEFAULT_MB, 8, 4096) == 2026
    assert hccl.fused_mc2_required_mb(hccl.fused_mc2_max_tokens(200, 8, 4096), 8, 4096) <= 200
    assert hccl.sync_area_bytes(16, 8) == 512 and hccl.sync_area_bytes(16, 9) == 1024
    with pytest.raises(ValueError, match="top_k and hidden_size"):
        hccl.fused_mc2_max_tokens(200, 0, 4096)
