"""GDN chunked prefill and recurrent decode against the naive recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ascend_kernels import gdn_prefill
from ascend_kernels.gdn import (
    CHUNK,
    chunk_gated_delta_rule,
    chunk_metadata,
    dot_precision,
    gated_delta_rule_decode,
    gated_delta_rule_ref,
)


def tol(device: str) -> dict[str, float]:
    """fp32 matmuls are exact in IEEE mode (CPU interpreter); TF32 on GPUs keeps ~10 bits."""
    if dot_precision(torch.device(device)) == "ieee":
        return {"rtol": 2e-3, "atol": 2e-4}
    return {"rtol": 1e-2, "atol": 3e-3}


def inputs(lens: list[int], hk: int, hv: int, kdim: int, vdim: int, device: str):
    tokens = sum(lens)
    cu = torch.tensor(
        [0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()],
        dtype=torch.int32,
        device=device,
    )
    q = F.normalize(torch.randn(tokens, hk, kdim, device=device), dim=-1)
    k = F.normalize(torch.randn(tokens, hk, kdim, device=device), dim=-1)
    v = torch.randn(tokens, hv, vdim, device=device)
    g = F.logsigmoid(torch.randn(tokens, hv, device=device))
    beta = torch.rand(tokens, hv, device=device)
    return q, k, v, g, beta, cu


def test_chunk_metadata_from_cu_seqlens():
    meta = chunk_metadata([0, 1, 1 + CHUNK, 1 + 3 * CHUNK + 5], "cpu")
    assert meta.num_chunks == 1 + 1 + 3
    assert meta.offsets.tolist() == [0, 1, 2, 5]
    assert meta.indices.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2]]


@pytest.mark.parametrize(
    ("lens", "heads", "dims"),
    [
        ([1], (1, 1), (16, 16)),
        ([70, 3, 130], (2, 4), (16, 24)),  # value heads share key heads; V not a power of two
        ([CHUNK, CHUNK + 1], (2, 2), (32, 32)),  # exact chunk boundary, then one over
        ([1, 1, 1, 1], (1, 2), (16, 16)),
        ([17, 33, 49, 200], (1, 2), (128, 128)),  # last chunks end inside each 16-row block
    ],
)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("split_wy", [False, True], ids=["wy-pieces", "wy-split"])
def test_chunked_prefill_matches_recurrence(
    device, lens, heads, dims, with_state, split_wy, monkeypatch
):
    monkeypatch.setattr(gdn_prefill, "WY_SPLIT", split_wy)
    q, k, v, g, beta, cu = inputs(lens, *heads, *dims, device)
    h0 = torch.randn(len(lens), heads[1], *dims, device=device) * 0.1 if with_state else None
    o, ht = chunk_gated_delta_rule(
        q, k, v, g, beta, cu, initial_state=h0, metadata=chunk_metadata(cu.cpu(), device)
    )
    o_ref, ht_ref = gated_delta_rule_ref(q, k, v, g, beta, cu, initial_state=h0)
    torch.testing.assert_close(o, o_ref, **tol(device))
    torch.testing.assert_close(ht, ht_ref, **tol(device))


@pytest.mark.parametrize("low", [False, True], ids=["fp32-scratch", "bf16-scratch"])
def test_prefill_bf16_inputs(device, low, monkeypatch):
    monkeypatch.setattr(gdn_prefill, "LOW_PRECISION", low)
    q, k, v, g, beta, cu = inputs([100, 29], 2, 4, 32, 32, device)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, cu)
    o_ref, ht_ref = gated_delta_rule_ref(q, k, v, g, beta, cu)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=2e-2)
    # 16-bit products: the state keeps about bf16's 8 bits (vLLM's FLA kernels do the same)
    torch.testing.assert_close(ht, ht_ref, **(dict(rtol=2e-2, atol=2e-2) if low else tol(device)))


def test_prefill_then_decode_continues_the_state(device):
    """Prefill of n tokens then decode of token n+1 equals the recurrence over n+1 tokens."""
    q, k, v, g, beta, cu = inputs([67], 1, 2, 16, 16, device)
    _, state = chunk_gated_delta_rule(
        q[:66],
        k[:66],
        v[:66],
        g[:66],
        beta[:66],
        torch.tensor([0, 66], dtype=torch.int32, device=device),
    )
    o_last = gated_delta_rule_decode(
        q[66:],
        k[66:],
        v[66:],
        g[66:],
        beta[66:],
        state,
        torch.zeros(1, dtype=torch.int32, device=device),
    )
    o_ref, ht_ref = gated_delta_rule_ref(q, k, v, g, beta, cu)
    torch.testing.assert_close(o_last[0], o_ref[66], **tol(device))
    torch.testing.assert_close(state[0], ht_ref[0], **tol(device))


def test_prefill_without_final_state_and_empty_batch(device):
    q, k, v, g, beta, cu = inputs([5], 1, 1, 16, 16, device)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, cu, output_final_state=False)
    assert ht is None and o.shape == (5, 1, 16)
    q, k, v, g, beta, cu = inputs([], 1, 1, 16, 16, device)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, cu)
    assert o.shape == (0, 1, 16) and ht.shape == (0, 1, 16, 16)


@pytest.mark.parametrize(("heads", "dims"), [((2, 4), (16, 24)), ((1, 1), (128, 128))])
def test_decode_matches_recurrence_and_skips_padding(device, heads, dims):
    batch = 5
    q, k, v, g, beta, _ = inputs([1] * batch, *heads, *dims, device)
    states = torch.randn(8, heads[1], *dims, device=device) * 0.1
    idx = torch.tensor([3, -1, 0, 7, 5], dtype=torch.int32, device=device)
    mine = states.clone()
    o = gated_delta_rule_decode(q, k, v, g, beta, mine, idx)
    keep = idx >= 0
    slots = idx[keep].long()
    cu = torch.arange(int(keep.sum()) + 1, dtype=torch.int32, device=device)
    o_ref, ht_ref = gated_delta_rule_ref(
        q[keep], k[keep], v[keep], g[keep], beta[keep], cu, initial_state=states[slots]
    )
    torch.testing.assert_close(o[keep], o_ref, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(mine[slots], ht_ref, rtol=2e-3, atol=2e-4)
    untouched = [1, 2, 4, 6]
    assert torch.equal(mine[untouched], states[untouched])
    assert torch.count_nonzero(o[~keep]) == 0


def test_bad_shapes_name_the_argument(device):
    q, k, v, g, beta, cu = inputs([4], 2, 3, 16, 16, device)
    with pytest.raises(ValueError, match="a multiple of Hk=2"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu)
    q, k, v, g, beta, cu = inputs([4], 2, 4, 16, 16, device)
    with pytest.raises(ValueError, match="beta must be"):
        chunk_gated_delta_rule(q, k, v, g, beta[:, :2], cu)
    with pytest.raises(ValueError, match="states must be fp32"):
        gated_delta_rule_decode(
            q,
            k,
            v,
            g,
            beta,
            torch.zeros(4, 4, 16, 16, dtype=torch.bfloat16, device=device),
            torch.zeros(4, dtype=torch.int32, device=device),
        )
