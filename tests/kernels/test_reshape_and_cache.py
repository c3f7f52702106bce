"""reshape_and_cache into per-layer and cross-layer (strided) paged caches."""

from __future__ import annotations

import pytest
import torch

from ascend_kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref


def slots_for(
    tokens: int, num_blocks: int, block_size: int, device: str, pads: int = 2
) -> torch.Tensor:
    slots = torch.randperm(num_blocks * block_size)[:tokens].to(torch.int64)
    if tokens > pads:
        slots[torch.randperm(tokens)[:pads]] = -1
    return slots.to(device)


@pytest.mark.parametrize(
    ("heads", "k_size", "v_size", "block_size"),
    [(4, 32, 32, 16), (1, 512, 64, 16), (3, 20, 7, 8), (8, 128, 128, 128)],
)
@pytest.mark.parametrize("layout", ["per_layer", "cross_layer"])
def test_matches_reference(device, heads, k_size, v_size, block_size, layout):
    layers, num_blocks, tokens = 3, 6, 37
    if layout == "cross_layer":  # (blocks, layers, block_size, heads, size); write layer 1's view
        kbuf = torch.zeros(num_blocks, layers, block_size, heads, k_size, device=device)
        vbuf = torch.zeros(num_blocks, layers, block_size, heads, v_size, device=device)
        kc, vc = kbuf[:, 1], vbuf[:, 1]
    else:
        kbuf = torch.zeros(num_blocks, block_size, heads, k_size, device=device)
        vbuf = torch.zeros(num_blocks, block_size, heads, v_size, device=device)
        kc, vc = kbuf, vbuf
    key = torch.randn(tokens, heads, k_size, device=device)
    value = torch.randn(tokens, heads, v_size, device=device)
    slots = slots_for(tokens, num_blocks, block_size, device)
    kref, vref = kbuf.clone(), vbuf.clone()
    reshape_and_cache(key, value, kc, vc, slots)
    if layout == "cross_layer":
        reshape_and_cache_ref(key, value, kref[:, 1], vref[:, 1], slots)
    else:
        reshape_and_cache_ref(key, value, kref, vref, slots)
    assert torch.equal(kbuf, kref) and torch.equal(vbuf, vref)
    assert torch.count_nonzero(kbuf) > 0
    if layout == "cross_layer":  # the other layers' slices stay untouched
        assert torch.count_nonzero(kbuf[:, 0]) == 0 and torch.count_nonzero(vbuf[:, 2]) == 0


def test_casts_to_the_cache_dtype_and_skips_all_padding(device):
    key = torch.randn(4, 2, 16, device=device)
    kc = torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16, device=device)
    vc = torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16, device=device)
    reshape_and_cache(key, key, kc, vc, torch.tensor([5, 0, 7, 2], device=device))
    # Within one bf16 step of the fp32 input (Triton's interpreter truncates, GPUs round).
    torch.testing.assert_close(kc.view(8, 2, 16)[[5, 0, 7, 2]].float(), key, rtol=2**-7, atol=0)
    kc.zero_()
    reshape_and_cache(key, key, kc, vc, torch.full((4,), -1, device=device))
    assert torch.count_nonzero(kc) == 0


def test_no_tokens(device):
    kc = torch.zeros(2, 4, 1, 8, device=device)
    reshape_and_cache(
        torch.empty(0, 1, 8, device=device),
        torch.empty(0, 1, 8, device=device),
        kc,
        kc.clone(),
        torch.empty(0, dtype=torch.int64, device=device),
    )
    assert torch.count_nonzero(kc) == 0


def test_shape_mismatch_is_explained(device):
    kc = torch.zeros(2, 4, 1, 8, device=device)
    with pytest.raises(ValueError, match="value_cache must be"):
        reshape_and_cache(
            torch.randn(3, 1, 8, device=device),
            torch.randn(3, 1, 4, device=device),
            kc,
            kc,
            torch.zeros(3, dtype=torch.int64, device=device),
        )
