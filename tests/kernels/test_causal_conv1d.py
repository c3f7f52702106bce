"""causal_conv1d prefill and decode update against their torch references."""

from __future__ import annotations

import pytest
import torch

from ascend_kernels.causal_conv1d import (
    causal_conv1d_prefill,
    causal_conv1d_prefill_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)


def packed(
    lens: list[int], dim: int, device: str, wide: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (tokens, dim) as a column slice of a wider projection (strided rows), and cu_seqlens."""
    tokens = sum(lens)
    x = torch.randn(tokens, dim + wide, device=device)[:, wide // 2 : wide // 2 + dim]
    cu = torch.tensor(
        [0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()],
        dtype=torch.int32,
        device=device,
    )
    return x, cu


def states_like(slots: int, dim: int, width: int, device: str, transposed: bool) -> torch.Tensor:
    if transposed:  # (slots, width-1, dim) storage seen as (slots, dim, width-1)
        return torch.randn(slots, width - 1, dim, device=device).transpose(1, 2)
    return torch.randn(slots, dim, width - 1, device=device)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize(
    ("lens", "dim"),
    [([1], 64), ([1, 1, 1], 300), ([5, 17, 2, 40], 1000), ([33], 512), ([3, 70], 257)],
)
def test_prefill_without_state(device, width, lens, dim):
    x, cu = packed(lens, dim, device, wide=24)
    weight = torch.randn(dim, width, device=device)
    bias = torch.randn(dim, device=device)
    got = causal_conv1d_prefill(x, weight, cu, bias=bias, activation="silu")
    want = causal_conv1d_prefill_ref(x, weight, cu, bias=bias, activation="silu")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("width", [2, 4])
def test_prefill_with_states_writes_final_states(device, width, transposed):
    lens = [1, 5, 17, 2, 40, 1]
    dim = 300
    x, cu = packed(lens, dim, device)
    weight = torch.randn(dim, width, device=device)
    states = states_like(9, dim, width, device, transposed)
    indices = torch.tensor([3, -1, 0, 5, 7, 8], dtype=torch.int32, device=device)
    initial = torch.tensor([1, 0, 0, 1, 1, 1], dtype=torch.bool, device=device)
    mine, ref = states.clone(), states.clone()
    got = causal_conv1d_prefill(
        x, weight, cu, conv_states=mine, cache_indices=indices, has_initial_state=initial
    )
    want = causal_conv1d_prefill_ref(
        x, weight, cu, conv_states=ref, cache_indices=indices, has_initial_state=initial
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    untouched = [1, 2, 4, 6]  # slots no sequence names, and the -1 padding sequence's
    assert torch.equal(mine[untouched], states[untouched])


@pytest.mark.parametrize(
    "lens",
    [[0, 3, 0, 40, 0], [2] * 37 + [0, 65] + [1] * 30],
    ids=["empty-sequences", "many-short-sequences"],
)
def test_prefill_many_and_empty_sequences(device, lens):
    """Empty sequences still get their state written (kept, or zeroed without an initial
    state), as in the reference; many sequences exercise the per-sequence chunk table."""
    dim, width = 200, 4
    x, cu = packed(lens, dim, device)
    weight = torch.randn(dim, width, device=device)
    states = states_like(len(lens), dim, width, device, transposed=True)
    indices = torch.arange(len(lens), dtype=torch.int32, device=device).flip(0)
    initial = torch.arange(len(lens), device=device) % 2 == 0
    mine, ref = states.clone(), states.clone()
    kw = {"cache_indices": indices, "has_initial_state": initial, "activation": "silu"}
    got = causal_conv1d_prefill(x, weight, cu, conv_states=mine, **kw)
    want = causal_conv1d_prefill_ref(x, weight, cu, conv_states=ref, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)


def test_prefill_continues_where_a_split_sequence_left_off(device):
    """Running a sequence in two prefill calls through the state equals one call."""
    dim, width = 96, 4
    x, _ = packed([23], dim, device)
    weight = torch.randn(dim, width, device=device)
    states = torch.zeros(1, dim, width - 1, device=device)
    idx = torch.zeros(1, dtype=torch.int32, device=device)
    whole = causal_conv1d_prefill(
        x, weight, torch.tensor([0, 23], dtype=torch.int32, device=device)
    )
    first = causal_conv1d_prefill(
        x[:10],
        weight,
        torch.tensor([0, 10], dtype=torch.int32, device=device),
        conv_states=states,
        cache_indices=idx,
    )
    second = causal_conv1d_prefill(
        x[10:].contiguous(), weight, torch.tensor([0, 13], dtype=torch.int32, device=device),
        conv_states=states, cache_indices=idx,
        has_initial_state=torch.ones(1, dtype=torch.bool, device=device),
    )  # fmt: skip
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-5)


def test_prefill_empty_batch(device):
    x = torch.empty(0, 64, device=device)
    out = causal_conv1d_prefill(
        x, torch.randn(64, 4, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    )
    assert out.shape == (0, 64)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize(("width", "dim"), [(4, 1000), (3, 256), (2, 40)])
def test_update(device, steps, width, dim):
    batch = 5
    x = torch.randn(batch, steps, dim, device=device)
    weight = torch.randn(dim, width, device=device)
    bias = torch.randn(dim, device=device) if width != 3 else None
    states = states_like(8, dim, width, device, transposed=width == 4)
    idx = torch.tensor([3, -1, 0, 7, 5], dtype=torch.int32, device=device)
    mine, ref = states.clone(), states.clone()
    got = causal_conv1d_update(
        x if steps > 1 else x[:, 0], mine, weight, idx, bias=bias, activation="silu"
    )
    want = causal_conv1d_update_ref(
        x if steps > 1 else x[:, 0], ref, weight, idx, bias=bias, activation="silu"
    )
    keep = idx >= 0
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)


def test_update_equals_prefill_of_the_same_tokens(device):
    dim, width = 200, 4
    states = torch.randn(2, dim, width - 1, device=device)
    weight = torch.randn(dim, width, device=device)
    x = torch.randn(2, 3, dim, device=device)
    idx = torch.tensor([1, 0], dtype=torch.int32, device=device)
    a, b = states.clone(), states.clone()
    dec = causal_conv1d_update(x, a, weight, idx)
    pre = causal_conv1d_prefill(
        x.reshape(6, dim), weight, torch.tensor([0, 3, 6], dtype=torch.int32, device=device),
        conv_states=b, cache_indices=idx,
        has_initial_state=torch.ones(2, dtype=torch.bool, device=device),
    )  # fmt: skip
    torch.testing.assert_close(dec.reshape(6, dim), pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b)


def test_update_empty_batch(device):
    out = causal_conv1d_update(
        torch.empty(0, 64, device=device), torch.zeros(2, 64, 3, device=device),
        torch.randn(64, 4, device=device), torch.empty(0, dtype=torch.int32, device=device),
    )  # fmt: skip
    assert out.shape == (0, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": (64, 5)}, "conv width must be 2..4"),
        ({"weight": (63, 4)}, "weight must be (dim=64"),
        ({"activation": "gelu"}, "activation must be None or 'silu'"),
    ],
)
def test_bad_arguments_name_the_problem(device, kwargs, message):
    weight = torch.randn(*kwargs.get("weight", (64, 4)), device=device)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        causal_conv1d_prefill(
            torch.randn(4, 64, device=device), weight,
            torch.tensor([0, 4], dtype=torch.int32, device=device),
            activation=kwargs.get("activation"),
        )  # fmt: skip
