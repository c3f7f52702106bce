"""The sim's physical step model (planner/sim_model.py -> sim/latency.py) against numbers worked
out by hand from Qwen3-235B-A22B's config and the published hardware figures."""

from __future__ import annotations

import pytest

from ascend_operator.planner import plan_manifest
from ascend_runtime.sim.latency import kv_transfer_seconds, spread, step_seconds
from helpers import manifest, pd_roles

GB = 1e9
PER_EXPERT = (235e9 - 22e9) / (128 - 8)  # one expert's parameters over all 94 layers
DENSE = 22e9 - 8 * PER_EXPERT


def _model(**spec):
    plan = plan_manifest(manifest(**spec))
    return plan.roles[0].runtime_config.sim


def test_weights_kv_and_flops_per_device_follow_the_layout():
    # One A3 node, TP 4 x DP 4, expert parallel over 16 devices, W8A8 (1 byte per parameter).
    m = _model(model={"quantization": "w8a8"}).step_model
    assert m.dense_weight_bytes == pytest.approx(DENSE / 4)
    assert m.local_experts == 8 and m.expert_weight_bytes == pytest.approx(PER_EXPERT)
    # 4 KV heads over TP 4: one head per device, K and V, 128 dims, bf16, 94 layers.
    assert m.kv_bytes_per_token == 94 * 2 * 1 * 128 * 2
    assert m.flops_per_token == pytest.approx(2 * 22e9 / 4)
    assert m.matmul_flops_per_second == 2 * 390e12  # INT8 peak for W8A8
    assert m.attention_flops_per_second == 390e12
    assert m.moe_floor_seconds_per_layer == pytest.approx((139 + 135) * 1e-6)  # EP 16


def test_kv_heads_are_replicated_beyond_their_count():
    w8a8 = {"quantization": "w8a8"}
    tp8 = _model(
        model=w8a8, roles=[{"name": "unified", "parallelism": {"tensor": 8, "expert": True}}]
    )
    # TP 8 over 4 KV heads: each head on two devices, so one head's bytes per device (not 1/2).
    assert tp8.step_model.kv_bytes_per_token == 94 * 2 * 1 * 128 * 2
    tp4 = _model(
        model=w8a8,
        roles=[{"name": "unified", "parallelism": {"tensor": 4, "data": 2, "expert": True}}],
    )
    # Same 8 devices, about the same weights per device: TP 4 x DP 2 caches each token once
    # per rank on half as many devices, so it holds twice the tokens of TP 8 (which stores
    # every head twice). Counting heads as if split would make them equal.
    assert tp4.num_blocks == pytest.approx(2 * tp8.num_blocks, rel=0.1)


def test_a_decode_step_is_the_roofline_plus_the_collectives():
    m = _model(model={"quantization": "w8a8"}).step_model
    contexts = [4000] * 144  # 36 sequences per data-parallel rank
    seconds = step_seconds(m, spread(m, [], contexts))
    touched = 1 - (1 - 8 / 128) ** 144  # almost every local expert sees a token
    weights = DENSE / 4 + 8 * touched * PER_EXPERT
    kv = 94 * 2 * 128 * 2 * 36 * 4000
    memory = (weights + kv) / 1600e9
    allreduce = 2 * 3 / 4 * 36 * 4096 * 2 / 146e9
    moe = (139 + 135) * 1e-6  # 9 tokens per device: the low-latency floor
    assert seconds == pytest.approx(memory + 94 * (allreduce + moe), rel=1e-6)
    assert 0.03 < seconds < 0.06  # the published TPOT is 48.7 ms


def test_a_prefill_step_is_compute_and_moe_bandwidth():
    m = _model(model={"quantization": "w8a8"}).step_model
    seconds = step_seconds(m, spread(m, [(0, 16384)] * 4, []))
    per_rank = 16384
    matmul = 2 * 22e9 / 4 * per_rank / 780e12
    attention = 4 * 64 * 128 * 94 / 4 * per_rank * (per_rank + 1) / 2 / 390e12
    elements = per_rank / 4 * 8 * 4096
    moe = elements * 1 / 107e9 + elements * 2 / 103e9
    allreduce = 2 * 3 / 4 * per_rank * 4096 * 2 / 146e9
    assert seconds == pytest.approx(matmul + attention + 94 * (moe + allreduce), rel=1e-6)


def test_fewer_tokens_touch_fewer_experts():
    m = _model(roles=[{"name": "unified", "parallelism": {"tensor": 4, "data": 4}}]).step_model
    assert not m.expert_parallel and m.local_experts == 128
    one, many = step_seconds(m, spread(m, [], [100])), step_seconds(m, spread(m, [], [100] * 64))
    assert one < many  # one token per rank reads 8 of 128 experts, 16 per rank read most


def test_pd_transfer_moves_the_prompts_kv_over_the_internode_link():
    plan = plan_manifest(manifest(roles=pd_roles({"kvPort": 36000}, {"kvPort": 36100})))
    m = plan.role("prefill").runtime_config.sim.step_model
    assert kv_transfer_seconds(m, 3584) == pytest.approx(3584 * 94 * 2 * 4 * 128 * 2 / 8 / 87e9)


def test_no_architecture_no_step_model():
    sim = _model(model={"architecture": {"preset": None, "hiddenSize": 1024}})
    assert sim.step_model is None


def test_the_busiest_rank_sets_the_step():
    # One 3584-token prompt lives on one data-parallel rank: the others wait for it.
    m = _model(model={"quantization": "w8a8"}).step_model
    alone = step_seconds(m, [([(0, 3584)], [])] + [([], [])] * 3)
    shared = step_seconds(m, spread(m, [(0, 896)] * 4, []))
    assert alone > 2 * shared
