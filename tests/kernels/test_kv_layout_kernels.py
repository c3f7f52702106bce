"""The kernels write and copy through ascend_runtime.kv.layout's views, in every layout."""

from __future__ import annotations

import pytest
import torch

from ascend_kernels.block_copy import copy_blocks_layers
from ascend_kernels.reshape_and_cache import reshape_and_cache
from ascend_runtime.kv.layout import LAYOUTS, KvLayout, KvSpec, allocate

SPECS = {
    "mha": KvSpec(num_layers=4, num_blocks=6, block_size=8, heads=2, k_dim=32, v_dim=32),
    "mla": KvSpec(num_layers=4, num_blocks=6, block_size=8, heads=1, k_dim=64, v_dim=16),
}


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("spec_id", SPECS)
def test_reshape_and_cache_then_offload_round_trip(device, name, spec_id):
    spec = SPECS[spec_id]
    bufs = allocate(KvLayout(spec, name), torch.bfloat16, device)
    ref = allocate(KvLayout(spec, "per_layer"), torch.bfloat16, "cpu")
    tokens = 29
    slots = torch.randperm(spec.num_blocks * spec.block_size)[:tokens].to(device)
    for layer in range(spec.num_layers):
        key = torch.randn(tokens, spec.heads, spec.k_dim, device=device).bfloat16()
        value = torch.randn(tokens, spec.heads, spec.v_dim, device=device).bfloat16()
        reshape_and_cache(key, value, *bufs.layer(layer), slots)
        k_ref, v_ref = ref.layer(layer)
        k_ref.view(-1, spec.heads, spec.k_dim)[slots.cpu()] = key.cpu()
        v_ref.view(-1, spec.heads, spec.v_dim)[slots.cpu()] = value.cpu()
    assert torch.equal(bufs.k.cpu(), ref.k) and torch.equal(bufs.v.cpu(), ref.v)

    # offload blocks 1, 4 to a second cache of the same layout and check them block by block
    other = allocate(KvLayout(spec, name), torch.bfloat16, device)
    src, dst = torch.tensor([1, 4]), torch.tensor([0, 5])
    for which in ("k", "v"):
        copy_blocks_layers(bufs.block_tensors(which), other.block_tensors(which), src, dst)
        got = getattr(other, which)[dst.to(device)]
        assert torch.equal(got, getattr(bufs, which)[src.to(device)])
        assert len(bufs.block_tensors(which)) == (1 if name.startswith("cross") else 4)
