"""Rank mapping of prefill->decode KV pulls: every decode rank receives exactly what it holds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_runtime.kv.rank_map import (
    Chunk,
    KvPlacement,
    plan_pulls,
    prefill_endpoint,
    sources,
)


def held(p: KvPlacement, rank: int, num_tokens: int) -> dict[tuple[int, int, int], tuple[int, int]]:
    """(block, offset, local head) -> (token, head) that rank `rank` of `p` stores."""
    _, tp_rank = p.split(rank)
    first = p.first_head(tp_rank)
    out = {}
    for t in range(num_tokens):
        if p.slot_of_token(t) != p.slot_of_rank(rank):
            continue
        pos = p.local_position(t)
        for j in range(p.heads_per_rank):
            out[pos // p.block_size, pos % p.block_size, j] = (t, first + j)
    return out


def check_plan(prefill: KvPlacement, decode: KvPlacement, num_tokens: int) -> list[list[Chunk]]:
    plans = plan_pulls(prefill, decode, num_tokens)
    assert len(plans) == decode.ranks
    sources_held = [held(prefill, r, num_tokens) for r in range(prefill.ranks)]
    covered: set[tuple[int, int]] = set()
    for rank, chunks in enumerate(plans):
        written: dict[tuple[int, int, int], tuple[int, int]] = {}
        for c in chunks:
            assert c.decode_rank == rank and c.tokens > 0 and c.heads > 0
            assert c.src_token + c.tokens <= prefill.block_size
            assert c.dst_token + c.tokens <= decode.block_size
            for i in range(c.tokens):
                for j in range(c.heads):
                    src = (c.src_block, c.src_token + i, c.src_head + j)
                    dst = (c.dst_block, c.dst_token + i, c.dst_head + j)
                    assert src in sources_held[c.prefill_rank], f"{c} reads {src}, not held"
                    assert dst not in written, f"{c} writes {dst} a second time"
                    written[dst] = sources_held[c.prefill_rank][src]
        assert written == held(decode, rank, num_tokens)
        covered |= set(written.values())
        assert all(c.src_block < prefill.blocks_needed(num_tokens) for c in chunks)
        assert all(c.dst_block < decode.blocks_needed(num_tokens) for c in chunks)
    heads = prefill.kv_heads
    assert covered == {(t, h) for t in range(num_tokens) for h in range(heads)}
    return plans


@st.composite
def placements(draw: st.DrawFn) -> tuple[KvPlacement, KvPlacement, int]:
    mla = draw(st.booleans())
    kv_heads = 1 if mla else draw(st.sampled_from([1, 2, 4, 8]))
    interleave = draw(st.sampled_from([1, 2, 4, 8, 16]))

    def one(role: str, allow_pcp: bool) -> KvPlacement:
        tp = draw(st.sampled_from([1, 2, 4, 8, 16]))
        if mla:
            dcp = draw(st.sampled_from([d for d in (1, 2, 4, 8) if tp % d == 0]))
        elif tp >= kv_heads:
            rep = tp // kv_heads
            dcp = draw(st.sampled_from([d for d in (1, 2, 4, 8) if rep % d == 0]))
        else:
            dcp = 1
        pcp = draw(st.sampled_from([1, 2, 3])) if allow_pcp else 1
        block = draw(st.sampled_from([4, 8, 16]))
        own_interleave = draw(st.sampled_from([interleave, block]))
        return KvPlacement(tp, kv_heads, block, pcp, dcp, own_interleave, mla, role)

    prefill = one("prefill", allow_pcp=True)
    decode = one("decode", allow_pcp=False)
    return prefill, decode, draw(st.integers(0, 300))


@settings(max_examples=300, deadline=None)
@given(placements())
def test_every_decode_rank_gets_exactly_what_it_holds(case):
    check_plan(*case)


@pytest.mark.parametrize(
    ("prefill", "decode"),
    [
        # Qwen3-235B (4 KV heads): prefill PCP2 TP8 -> decode TP4 DCP... and the PD tutorial shape
        (KvPlacement(8, 4, 128, pcp=2, interleave=128), KvPlacement(4, 4, 128)),
        (
            KvPlacement(8, 4, 128, pcp=2, interleave=128),
            KvPlacement(8, 4, 128, dcp=2, interleave=128),
        ),
        (KvPlacement(8, 4, 128), KvPlacement(4, 4, 128)),
        # DeepSeek-style MLA: TP16 prefill -> TP8 DCP8 decode
        (KvPlacement(16, 1, 128, mla=True), KvPlacement(8, 1, 128, dcp=8, mla=True, interleave=1)),
    ],
)
def test_published_shapes(prefill, decode):
    plans = check_plan(prefill, decode, 4096 + 17)
    for chunks in plans:
        # without token interleaving on either side, whole blocks move in one chunk per head run
        if prefill.slots == decode.slots == 1:
            assert all(c.tokens == 128 for c in chunks[:-1])


def test_replicas_spread_decode_ranks_over_prefill_ranks():
    # 2 KV heads over prefill TP 8: 4 replicas per head; each decode rank reads a different one
    plans = plan_pulls(KvPlacement(8, 2, 16), KvPlacement(4, 2, 16), 64)
    assert [sources(c) for c in plans] == [[0], [1], [6], [7]]


def test_gqa_with_more_heads_than_decode_ranks_pulls_from_several_prefill_ranks():
    plans = plan_pulls(KvPlacement(8, 8, 16), KvPlacement(2, 8, 16), 32)
    assert [sources(c) for c in plans] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    check_plan(KvPlacement(8, 8, 16), KvPlacement(2, 8, 16), 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tp=6, kv_heads=4, block_size=16), "not a multiple of the model's 4 KV heads"),
        (dict(tp=8, kv_heads=4, block_size=16, dcp=4), "decodeContext 4 must divide"),
        (dict(tp=2, kv_heads=4, block_size=16, dcp=2), "needs tensor parallel >= 8"),
        (dict(tp=6, kv_heads=1, block_size=16, dcp=4, mla=True), "multiple of decodeContext"),
        (dict(tp=4, kv_heads=2, block_size=16, mla=True), "kv_heads must be 1"),
        (dict(tp=4, kv_heads=4, block_size=0), "block_size must be >= 1"),
    ],
)
def test_invalid_placements_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KvPlacement(**kwargs, role="decode")


def test_sides_must_serve_the_same_model():
    with pytest.raises(ValueError, match="same model"):
        plan_pulls(KvPlacement(4, 4, 16), KvPlacement(4, 2, 16), 8)


def test_prefill_endpoint_uses_the_rank_host_and_handshake_port():
    p = KvPlacement(tp=4, kv_heads=4, block_size=16, pcp=2)
    params = {"remote_host": "10.0.0.1", "remote_port": 36000, "remote_hosts": {"5": "10.0.0.2"}}
    assert prefill_endpoint(params, p, 0) == ("10.0.0.1", 36000)
    assert prefill_endpoint(params, p, 5) == ("10.0.0.2", 36005)  # pcp 1, tp 1: 36000 + 4 + 1
    assert prefill_endpoint(params | {"remote_ports": {"5": 9}}, p, 5) == ("10.0.0.2", 9)
    with pytest.raises(ValueError, match="no host for prefill rank 3"):
        prefill_endpoint({"remote_port": 1}, p, 3)


@pytest.mark.parametrize(
    "kw",
    [
        {"tp": 1, "kv_heads": 2, "block_size": 16},
        {"tp": 4, "kv_heads": 2, "block_size": 16, "pcp": 2, "dcp": 2, "interleave": 16},
        {"tp": 4, "kv_heads": 2, "block_size": 16, "dcp": 2, "interleave": 1},
        {"tp": 2, "kv_heads": 2, "block_size": 16, "pcp": 2, "interleave": 4},
    ],
)
def test_whole_block_tokens_fill_blocks_without_lengthening_the_table(kw):
    p = KvPlacement(**kw)
    for n in range(1, 200):
        m = p.whole_block_tokens(n)
        assert m >= n and p.blocks_needed(m) == p.blocks_needed(n), (n, m)
        assert all(p.tokens_of_slot(s, m) % p.block_size == 0 for s in range(p.slots)), (n, m)
