"""Prefix caching in the sim engine (as vLLM's automatic prefix caching does it): block-hash
chains, reuse on a hit with prefill charged only for uncached tokens, LRU eviction of free
cached blocks, KV events, metrics, and outputs identical with and without hits. Our engine
alone (the sim); no real vLLM involved."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from ascend_runtime.config import SimSettings
from ascend_runtime.kv.block_hash import ROOT_HASH, block_hashes, hash_block
from ascend_runtime.kv.cache_events import AllBlocksCleared, BlockRemoved, BlockStored
from ascend_runtime.sim.engine import EngineObserver, Sequence, SimEngine
from ascend_runtime.sim.metrics import EngineMetrics
from ascend_runtime.sim.prefix_cache import PrefixCachePool

BS = 4


def test_hashes_chain_over_parents_and_only_full_blocks():
    a = block_hashes(list(range(10)), BS)
    assert len(a) == 2  # 10 tokens: two full blocks of 4, the last 2 tokens unhashed
    assert a[0] == hash_block(ROOT_HASH, [0, 1, 2, 3])
    assert a[1] == hash_block(a[0], [4, 5, 6, 7])
    # Same second block after a different first one: a different hash.
    b = block_hashes([9, 1, 2, 3, 4, 5, 6, 7], BS)
    assert b[1] != a[1]
    assert block_hashes(list(range(10)), BS, start=a[:1]) == a
    assert block_hashes(list(range(12)), BS, limit=2) == a


def test_pool_matches_the_longest_prefix_and_evicts_least_recently_used_tails_first():
    pool = PrefixCachePool(4, BS)
    events = []
    pool.listeners.append(events.append)
    tokens = list(range(8))
    hashes = block_hashes(tokens, BS)
    blocks = pool.allocate(2)
    pool.store(blocks, hashes, None, lambda i: tokens[i * BS : (i + 1) * BS])
    assert events == [BlockStored(hashes, None, tokens, BS)]
    assert pool.match(hashes) == blocks and pool.match([hash_block(ROOT_HASH, [9] * BS)]) == []
    pool.release(blocks)
    assert pool.free == 4 and pool.cached_blocks == 2  # free but still cached
    # Two fresh blocks come from the never-used ones first, then the cached tail is evicted.
    assert pool.allocate(2) is not None and pool.cached_blocks == 2
    assert pool.allocate(1) == [blocks[1]]
    assert events[-1] == BlockRemoved([hashes[1]])
    assert pool.match(hashes) == [blocks[0]]
    assert pool.clear() is False  # blocks in use: refused, nothing forgotten
    assert pool.cached_blocks == 1


def test_pool_shares_blocks_by_reference_and_clears_when_idle():
    pool = PrefixCachePool(2, BS)
    events = []
    pool.listeners.append(events.append)
    hashes = block_hashes([1, 2, 3, 4], BS)
    (b,) = pool.allocate(1)
    pool.store([b], hashes, None, lambda i: [1, 2, 3, 4])
    assert pool.free_among([b]) == 0
    pool.take([b])  # a second sequence shares it
    pool.release([b])
    assert pool.free == 1  # still referenced once
    pool.release([b])
    assert pool.free == 2 and pool.free_among([b]) == 1
    assert pool.clear() is True and pool.cached_blocks == 0
    assert isinstance(events[-1], AllBlocksCleared)


class Prefills(EngineObserver):
    def __init__(self):
        self.prefill_tokens = 0
        self.lookups: list[tuple[int, int]] = []

    def on_step(self, prefill_tokens: int, decode_tokens: int) -> None:
        self.prefill_tokens += prefill_tokens

    def on_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.lookups.append((queried_tokens, hit_tokens))


def _engine(caching: bool, observer=None, **kw) -> tuple[SimEngine, list[float]]:
    now = [0.0]
    settings = SimSettings(
        block_size=BS, num_blocks=kw.pop("num_blocks", 64), max_num_seqs=4,
        max_num_batched_tokens=64, prefill_tokens_per_second=1000.0, decode_step_seconds=0.01,
        prefix_caching=caching, **kw,
    )  # fmt: skip
    return SimEngine(settings, observer, clock=lambda: now[0]), now


def _run(engine: SimEngine, now: list[float], seq: Sequence) -> Sequence:
    seq.arrival = now[0]
    engine.add(seq)
    while not seq.finished:
        step = engine.begin_step()
        assert step is not None
        now[0] += step.seconds
        engine.end_step(step)
    return seq


def _seq(rid: str, prompt: list[int], max_tokens: int = 6, timing: bool = False) -> Sequence:
    return Sequence(rid, list(prompt), max_tokens, temperature=0.8, sample_seed=3, seed=0,
                    timing_only=timing)  # fmt: skip


PROMPT = list(range(100, 130))  # 30 tokens: 7 full blocks


def test_a_repeated_prompt_prefills_only_what_is_not_cached_and_outputs_stay_identical():
    observer = Prefills()
    engine, now = _engine(True, observer)
    first = _run(engine, now, _seq("a", PROMPT))
    ttft_first = first.first_token_at - first.arrival
    assert observer.prefill_tokens == 30
    second = _run(engine, now, _seq("b", PROMPT))
    # 7 full blocks cached = 28 tokens; only the last 2 are prefilled again.
    assert observer.lookups == [(30, 0), (30, 28)]
    assert observer.prefill_tokens == 32
    assert second.first_token_at - second.arrival == pytest.approx(ttft_first * 2 / 30)
    cold, cold_now = _engine(False)
    reference = _run(cold, cold_now, _seq("c", PROMPT))
    assert first.output == second.output == reference.output
    assert engine.cache.hit_tokens == 28 and engine.cache.queried_tokens == 60


def test_a_fully_cached_prompt_still_computes_its_last_token():
    observer = Prefills()
    engine, now = _engine(True, observer)
    prompt = list(range(16))  # exactly 4 blocks
    _run(engine, now, _seq("a", prompt, max_tokens=1))
    _run(engine, now, _seq("b", prompt, max_tokens=1))
    assert observer.lookups[-1] == (16, 12)  # 3 blocks: the 4th holds the last token


def test_generated_tokens_are_cached_for_the_next_turn():
    observer = Prefills()
    engine, now = _engine(True, observer)
    first = _run(engine, now, _seq("a", PROMPT, max_tokens=10))
    follow_up = PROMPT + first.output + [7, 8, 9]  # 43 tokens
    _run(engine, now, _seq("b", follow_up))
    # Prompt and 10 outputs = 40 tokens; 39 have KV (the last output was never fed back):
    # 9 full blocks = 36 tokens cached.
    assert observer.lookups[-1] == (43, 36)


def test_free_cached_blocks_are_evicted_least_recently_used_first():
    engine, now = _engine(True, num_blocks=12)
    a, b = list(range(1000, 1024)), list(range(2000, 2024))  # 6 blocks each
    _run(engine, now, _seq("a", a, max_tokens=1, timing=True))
    _run(engine, now, _seq("b", b, max_tokens=1, timing=True))
    _run(engine, now, _seq("a2", a, max_tokens=1, timing=True))  # touches a's blocks
    # A third prompt needs blocks: b's, the least recently used, go (its tail first).
    _run(engine, now, _seq("c", list(range(3000, 3024)), max_tokens=1, timing=True))
    cache = engine.cache
    assert len(cache.match(block_hashes(a, BS))) >= 4
    assert len(cache.match(block_hashes(b, BS))) < 5


def test_a_preempted_sequence_finds_its_own_blocks_again():
    observer = Prefills()
    engine, now = _engine(True, observer, num_blocks=12)
    old = _seq("old", list(range(24)), max_tokens=20, timing=True)
    young = _seq("young", list(range(500, 524)), max_tokens=20, timing=True)
    old.arrival, young.arrival = 0.0, 0.001
    engine.add(old)
    engine.add(young)
    while not (old.finished and young.finished):
        step = engine.begin_step()
        assert step is not None
        now[0] += step.seconds
        engine.end_step(step)
    assert young.preemptions >= 1
    assert any(hit > 0 for _, hit in observer.lookups[2:])


def test_metrics_export_vllm_prefix_cache_counters():
    metrics = EngineMetrics("tiny", "0")
    engine, now = _engine(True, metrics)
    _run(engine, now, _seq("a", PROMPT))
    _run(engine, now, _seq("b", PROMPT))
    text = generate_latest(metrics.registry).decode()
    assert 'vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 60.0' in text
    assert 'vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 28.0' in text


def test_engine_publishes_stored_and_removed_events_that_rebuild_its_cache():
    engine, now = _engine(True, num_blocks=10)
    events = []
    engine.cache.listeners.append(events.append)
    for i in range(4):
        _run(engine, now, _seq(str(i), list(range(i * 100, i * 100 + 24)), max_tokens=1,
                                 timing=True))  # fmt: skip
    # A subscriber replaying the events holds exactly what the engine caches.
    held: set[int] = set()
    for event in events:
        if isinstance(event, BlockStored):
            held |= set(event.block_hashes)
            assert len(event.token_ids) == len(event.block_hashes) * BS
        elif isinstance(event, BlockRemoved):
            held -= set(event.block_hashes)
    assert any(isinstance(e, BlockRemoved) for e in events)
    assert held == set(engine.cache._block_of)


def test_no_caching_by_default():
    engine = SimEngine(SimSettings())
    assert engine.cache is None
    assert "prefix_caching" not in SimSettings().model_dump()
