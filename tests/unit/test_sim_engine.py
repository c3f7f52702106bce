"""The sim engine's scheduler: determinism, batching limits, KV blocks, preemption, abort."""

from __future__ import annotations

import asyncio

import pytest

from ascend_runtime.config import SimSettings
from ascend_runtime.sim import model
from ascend_runtime.sim.engine import Sequence, SimEngine


def seq(rid: str, prompt_len: int, max_tokens: int, temperature: float = 0.0) -> Sequence:
    prompt = model.tokenize(" ".join(f"w{rid}{i}" for i in range(prompt_len)))
    return Sequence(
        request_id=rid,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        sample_seed=7,
        seed=0,
    )


async def run_all(engine: SimEngine, seqs: list[Sequence], observe=None) -> list[list[int]]:
    engine.start()
    for s in seqs:
        engine.add(s)

    async def drain(s: Sequence) -> list[int]:
        out = []
        while True:
            event = await s.events.get()
            if observe:
                observe(engine)
            if event.kind == "token":
                out.append(event.token)
            elif event.kind == "finish":
                return out
            else:
                raise AssertionError(event.reason)

    try:
        return await asyncio.wait_for(asyncio.gather(*(drain(s) for s in seqs)), 20)
    finally:
        await engine.stop()


def settings(**kw) -> SimSettings:
    return SimSettings(
        **{
            "block_size": 4,
            "num_blocks": 256,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 64,
            **kw,
        }
    )


def test_deterministic_and_independent_of_batching():
    alone = asyncio.run(run_all(SimEngine(settings()), [seq("a", 10, 12)]))[0]
    crowded = asyncio.run(
        run_all(
            SimEngine(settings(max_num_seqs=3)),
            [seq(str(i), 5 + i, 12) for i in range(6)] + [seq("a", 10, 12)],
        )
    )
    assert crowded[-1] == alone and len(alone) == 12


def test_running_never_exceeds_max_num_seqs():
    peak = []
    asyncio.run(
        run_all(
            SimEngine(settings(max_num_seqs=3)),
            [seq(str(i), 4, 6) for i in range(10)],
            observe=lambda e: peak.append(len(e.running)),
        )
    )
    assert max(peak) <= 3


def test_token_budget_chunks_prefill():
    engine = SimEngine(settings(max_num_batched_tokens=8))
    outputs = asyncio.run(run_all(engine, [seq("long", 40, 2)]))
    assert outputs[0] and engine.steps >= 5  # 40 prompt tokens in chunks of at most 8


def test_preemption_when_kv_full_keeps_outputs_and_frees_blocks():
    seqs = [seq(str(i), 6, 10) for i in range(4)]
    reference = asyncio.run(run_all(SimEngine(settings()), [seq(str(i), 6, 10) for i in range(4)]))
    tight = SimEngine(settings(num_blocks=12))  # 4 sequences x 4 blocks each do not fit
    outputs = asyncio.run(run_all(tight, seqs))
    assert outputs == reference
    assert sum(s.preemptions for s in seqs) > 0
    assert tight.pool.used == 0


def test_sequence_larger_than_cache_fails_clearly():
    engine = SimEngine(settings(num_blocks=2))
    with pytest.raises(AssertionError, match="KV cache cannot hold"):
        asyncio.run(run_all(engine, [seq("big", 6, 10)]))


def test_abort_frees_blocks():
    async def scenario() -> int:
        engine = SimEngine(settings(fixed_itl_seconds=0.01))
        s = seq("x", 8, 1000)
        engine.start()
        engine.add(s)
        await s.events.get()
        engine.abort(s)
        used = engine.pool.used
        await engine.stop()
        return used

    assert asyncio.run(scenario()) == 0


def test_latency_model_shapes():
    engine = SimEngine(
        settings(
            prefill_tokens_per_second=1000,
            decode_step_seconds=0.01,
            decode_seconds_per_kv_token=0.001,
        )
    )
    s = seq("a", 10, 1)
    assert engine.step_seconds(500, []) == pytest.approx(0.5)
    assert engine.step_seconds(0, [s]) == pytest.approx(0.01 + 0.001 * len(s.tokens))
    fixed = SimEngine(settings(fixed_ttft_seconds=0.2, fixed_itl_seconds=0.05))
    assert fixed.step_seconds(5, [s]) == pytest.approx(0.25)
