"""Cross-layer and per-layer KV layouts: strided per-layer views, spans, inverse permutation."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ascend_runtime.kv.layout import (
    LAYOUTS,
    KvLayout,
    KvSpec,
    allocate,
    inverse_permutation,
    physical_order,
)

torch = pytest.importorskip("torch", reason="KV layout allocation tests need the 'kernels' extra")

MHA = KvSpec(num_layers=3, num_blocks=5, block_size=4, heads=2, k_dim=8, v_dim=8)
MLA = KvSpec(num_layers=3, num_blocks=5, block_size=4, heads=1, k_dim=16, v_dim=4)  # 512 vs 64


@given(st.permutations(range(6)))
def test_inverse_permutation_undoes_any_order(order):
    order = tuple(order)
    t = torch.arange(2 * 3 * 4 * 5 * 6 * 7).reshape(2, 3, 4, 5, 6, 7)
    assert torch.equal(t.permute(order).permute(inverse_permutation(order)), t)


def test_not_a_permutation():
    with pytest.raises(ValueError, match="not a permutation"):
        inverse_permutation((0, 2, 2))


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("spec", [MHA, MLA], ids=["mha", "mla"])
def test_per_layer_views_agree_with_the_per_layer_layout(name, spec):
    bufs = allocate(KvLayout(spec, name), torch.float16)
    ref_k = [
        torch.zeros(spec.num_blocks, spec.block_size, spec.heads, spec.k_dim) for _ in range(3)
    ]
    ref_v = [
        torch.zeros(spec.num_blocks, spec.block_size, spec.heads, spec.v_dim) for _ in range(3)
    ]
    for layer, (k_view, v_view) in enumerate(bufs.layer_views()):
        assert k_view.shape == ref_k[layer].shape and v_view.shape == ref_v[layer].shape
        k_data, v_data = torch.randn_like(ref_k[layer]), torch.randn_like(ref_v[layer])
        k_view.copy_(k_data)  # a kernel writing in place through the strided view
        v_view.copy_(v_data)
        ref_k[layer].copy_(k_data.half())
        ref_v[layer].copy_(v_data.half())
    for layer in range(spec.num_layers):
        assert torch.equal(bufs.k[:, layer].float(), ref_k[layer])
        assert torch.equal(bufs.v[:, layer].float(), ref_v[layer])
    # the raw buffer is the logical cache in the layout's physical order
    order = physical_order(name)
    assert torch.equal(bufs.k_raw, bufs.k.permute(order))
    if KvLayout(spec, name).cross_layer:  # one block = every layer's K for it, contiguous
        block = bufs.k_raw[2].flatten()
        assert torch.equal(block, bufs.k[2].permute([o - 1 for o in order[1:]]).flatten())


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("spec", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("which", ["k", "v"])
def test_spans_cover_exactly_the_selected_elements(name, spec, which):
    layout = KvLayout(spec, name)
    n = 1
    for s in spec.logical_shape(which):
        n *= s
    index = (
        torch.arange(n)
        .reshape(layout.physical_shape(which))
        .permute(inverse_permutation(layout.order))
    )
    assert index.stride() == layout.strides(which)
    heads = range(spec.heads)
    for block, token, wanted, head in itertools.product((0, 3), (0, 1), (1, 3), heads):
        tokens = min(wanted, spec.block_size - token)
        count = spec.heads - head
        spans = layout.spans(which, block, token, tokens, head, count)
        got = set()
        for off, length in spans:
            assert off % spec.itemsize == 0 and length > 0
            got |= set(range(off // spec.itemsize, (off + length) // spec.itemsize))
        want = index[block, :, token : token + tokens, head : head + count].flatten().tolist()
        assert got == set(want) and len(want) == sum(ln for _, ln in spans) // spec.itemsize
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(spans)), "unmerged spans"


def test_cross_layer_block_is_one_segment_per_k_and_v():
    cross, per = KvLayout(MLA, "cross_layer"), KvLayout(MLA, "per_layer")
    assert cross.block_segments("k", 1) == [(1 * 3 * 4 * 16 * 2, 3 * 4 * 16 * 2)]
    assert len(per.block_segments("k", 1)) == MLA.num_layers
    assert sum(n for _, n in cross.block_segments("v", 4)) == 3 * 4 * 1 * 4 * 2  # V's own size
    assert MLA.block_bytes() == 3 * 4 * (16 + 4) * 2


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ("sideways", "unknown KV layout 'sideways'"),
        (("tokens", "blocks", "layers", "heads", "dim"), "puts 'tokens' outside 'blocks'"),
        (("blocks", "layers", "tokens", "heads"), "exactly the dims"),
    ],
)
def test_bad_layouts_are_explained(order, message):
    with pytest.raises(ValueError, match=message):
        physical_order(order)


def test_spec_and_dtype_mismatch_are_explained():
    with pytest.raises(ValueError, match=r"KvSpec\.heads must be >= 1"):
        KvSpec(num_layers=1, num_blocks=1, block_size=1, heads=0, k_dim=1, v_dim=1)
    with pytest.raises(ValueError, match="itemsize=2"):
        allocate(KvLayout(MHA), torch.float32)
    with pytest.raises(ValueError, match="outside a 4 block"):
        KvLayout(MHA).spans("k", 0, 3, 2, 0, 1)
