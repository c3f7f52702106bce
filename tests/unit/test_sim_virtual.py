"""The sim engine on its virtual clock (`ascend-serve simulate`): hand-computed timings, the same
scheduler as the real-time engine, PD hand-over, and the command line. Sim engine only."""

from __future__ import annotations

import asyncio
import io
import json
import math

import pytest

from ascend_operator.cli import main
from ascend_runtime.config import SimSettings
from ascend_runtime.sim.engine import EngineObserver, Sequence, SimEngine
from ascend_runtime.sim.virtual import VirtualRun, Workload, summarize
from helpers import EXAMPLES


def fixed(ttft: float, itl: float, **kw) -> SimSettings:
    return SimSettings(
        **{"block_size": 16, "num_blocks": 4096, "max_num_seqs": 8, "max_num_batched_tokens": 4096,
           "fixed_ttft_seconds": ttft, "fixed_itl_seconds": itl, **kw}
    )  # fmt: skip


def test_one_request_at_a_time_is_hand_computable():
    run = VirtualRun({"unified": (fixed(0.1, 0.01), 1)})
    done = run.run([(10, 5)] * 4, concurrency=1, request_rate=math.inf)
    result = summarize(run, done)
    # Each request: one prefill step (0.1 s, first token), then 4 decode steps of 0.01 s.
    assert result["completed"] == 4 and result["total_output_tokens"] == 20
    assert result["mean_ttft_ms"] == pytest.approx(100)
    assert result["mean_tpot_ms"] == pytest.approx(10)
    assert result["duration"] == pytest.approx(4 * 0.14)
    assert result["output_throughput"] == pytest.approx(20 / 0.56)


def test_batching_shares_steps_and_the_router_spreads_instances():
    one = VirtualRun({"unified": (fixed(0.1, 0.01), 1)})
    r1 = summarize(one, one.run([(10, 5)] * 4, concurrency=None, request_rate=math.inf))
    # All four prefill in one step and decode together: one request's time for all.
    assert r1["duration"] == pytest.approx(0.14)
    small = fixed(0.1, 0.01, max_num_seqs=2)
    two = VirtualRun({"unified": (small, 2)})
    r2 = summarize(two, two.run([(10, 5)] * 4, concurrency=None, request_rate=math.inf))
    assert r2["duration"] == pytest.approx(0.14)  # 2 per instance on 2 instances
    alone = VirtualRun({"unified": (small, 1)})
    r3 = summarize(alone, alone.run([(10, 5)] * 4, concurrency=None, request_rate=math.inf))
    assert r3["duration"] > r2["duration"]


def test_pd_hands_over_after_the_transfer():
    run = VirtualRun(
        {"prefill": (fixed(0.1, 0.01), 1), "decode": (fixed(0.1, 0.01), 1)},
        kv_transfer_seconds=0.05,
    )
    done = run.run([(10, 5)], concurrency=1, request_rate=math.inf)
    result = summarize(run, done)
    # Prefill 0.1 s, transfer 0.05 s, then decode emits the first token after one 0.01 s step.
    assert result["mean_ttft_ms"] == pytest.approx(160)
    assert result["total_output_tokens"] == 5
    assert all(e.pool.used == 0 for _, e in run.engines)  # the prefill's held blocks freed


def test_pd_moves_only_what_the_decode_instance_does_not_cache():
    cached = fixed(0.1, 0.01, prefix_caching=True)
    moved = []
    run = VirtualRun(
        {"prefill": (cached, 1), "decode": (cached, 1)},
        kv_transfer_seconds=lambda tokens: moved.append(tokens) or tokens * 1e-3,
    )
    shared = list(range(1, 161))  # 10 blocks of 16
    prompts = [[*shared, 500, 501], [*shared, 600, 601, 602]]
    done = run.run([(len(p), 4) for p in prompts], 1, math.inf, prompts=prompts, after=[None, 0])
    assert summarize(run, done)["completed"] == 2
    # The first prompt travels whole; the follow-up's 10 shared blocks are on the decode
    # instance already (cached once its KV landed), so 3 tokens travel.
    assert moved == [162, 3] and run.transferred_tokens == 165
    decode = run.engines[1][1]
    assert decode.cache.hit_tokens == 160 and decode.pool.used == 0
    # Blocks are shared, not filled: the hit blocks keep the first request's hashes.
    assert decode.cache.cached_blocks >= 10


def test_the_router_hears_each_instances_first_token_and_end_by_that_instance():
    """In PD a request's prefill and decode run on different instances; the router must be
    told of each on the instance it happened on, or the decode instance's prefill work and
    in-flight blocks stay counted forever (they did, until the decode's first token was
    reported with the prefill's index)."""
    heard: list[tuple[str, int, int]] = []

    class Recorder:
        def pick(self, role, prompt, candidates):
            return candidates[-1]

        def first_token(self, index, prompt):
            heard.append(("first", index, len(prompt)))

        def done(self, index, prompt):
            heard.append(("done", index, len(prompt)))

    run = VirtualRun(
        {"prefill": (fixed(0.1, 0.01), 2), "decode": (fixed(0.1, 0.01), 2)},
        kv_transfer_seconds=0.01, router=Recorder(),
    )  # fmt: skip
    done = run.run([(10, 3)], concurrency=1, request_rate=math.inf)
    assert summarize(run, done)["completed"] == 1
    roles = [role for role, _ in run.engines]
    prefill, decode = roles.index("prefill") + 1, roles.index("decode") + 1  # the last of each
    assert heard == [("first", prefill, 10), ("done", prefill, 10),
                     ("first", decode, 10), ("done", decode, 10)], (heard, roles)  # fmt: skip


def test_a_request_the_cache_cannot_hold_fails_instead_of_hanging():
    run = VirtualRun({"unified": (fixed(0.01, 0.01, num_blocks=2), 1)})
    done = run.run([(10, 100)], concurrency=1, request_rate=math.inf)
    assert summarize(run, done)["failed"] == 1


def test_the_hot_path_never_copies_whole_sequences(monkeypatch):
    def copy(self):
        raise AssertionError("Sequence.tokens copied in the scheduler's hot path")

    monkeypatch.setattr(Sequence, "tokens", property(copy))
    run = VirtualRun({"unified": (fixed(0.01, 0.01, max_num_seqs=64), 1)})
    assert summarize(run, run.run([(100, 20)] * 64, None, math.inf))["completed"] == 64
    twin = [Sequence("a", [1], 1, 0.0, 0, 0), Sequence("a", [1], 1, 0.0, 0, 0)]
    assert len({twin[0]: 1, twin[1]: 2}) == 2  # identity, not field equality


def test_real_time_engine_and_virtual_clock_agree():
    settings = fixed(0.05, 0.02)
    lengths = [(20, 8)] * 4

    class Times(EngineObserver):
        def __init__(self):
            self.first, self.last = {}, {}

        def on_token(self, seq, itl):
            self.first.setdefault(seq.request_id, engine.clock())
            self.last[seq.request_id] = engine.clock()

    times = Times()
    engine = SimEngine(settings, times)

    async def real() -> float:
        engine.start()
        start = engine.clock()
        seqs = [Sequence(str(i), [0] * n, m, 0.0, 0, 0) for i, (n, m) in enumerate(lengths)]
        for s in seqs:
            engine.add(s)
        for s in seqs:
            while (await asyncio.wait_for(s.events.get(), 10)).kind != "finish":
                pass
        await engine.stop()
        return start

    start = asyncio.run(real())
    ttft = sum(times.first[str(i)] - start for i in range(4)) / 4
    tpot = sum((times.last[str(i)] - times.first[str(i)]) / 7 for i in range(4)) / 4
    run = VirtualRun({"unified": (settings, 1)})
    virtual = summarize(run, run.run(lengths, None, math.inf))
    # Real sleeps only ever run long (a loaded machine adds to them, never subtracts).
    assert virtual["mean_ttft_ms"] / 1000 <= ttft <= 2 * virtual["mean_ttft_ms"] / 1000 + 0.05
    assert virtual["mean_tpot_ms"] / 1000 <= tpot * 1.02
    assert tpot <= 2 * virtual["mean_tpot_ms"] / 1000 + 0.02


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("random:3584:1536", Workload(3584, 1536, 0.0)),
        ("random:100:10:0.5", Workload(100, 10, 0.5)),
        ("fixed:8:4", Workload(8, 4, 0.0)),
    ],
)
def test_workloads(text, expected):
    assert Workload.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    ["random:0:10", "random:10", "fixed:8:4:0.1", "poisson:1:2", "random:a:b", "random:8:4:1"],
)
def test_bad_workloads_are_refused(text):
    with pytest.raises(ValueError, match="workload"):
        Workload.parse(text)


def test_sampled_lengths_stay_in_range():
    import random

    lengths = Workload(100, 10, 0.5).draw(random.Random(1), 500)
    assert {n for n, _ in lengths} <= set(range(50, 151)) and len({n for n, _ in lengths}) > 50


def _simulate(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["simulate", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_simulate_command_prints_and_writes_vllm_bench_keys(tmp_path):
    path = tmp_path / "result.json"
    code, out, err = _simulate(
        "-f", str(EXAMPLES / "tiny-sim-pd.yaml"), "--workload", "random:64:16",
        "--requests", "20", "--concurrency", "4", "--json", str(path),
    )  # fmt: skip
    assert code == 0, err
    assert "Output token throughput (tok/s):" in out and "Mean TTFT (ms):" in out
    result = json.loads(path.read_text())
    for key in ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "mean_itl_ms", "request_throughput", "completed"):  # fmt: skip
        assert key in result
    assert result["completed"] == 20 and result["total_output_tokens"] == 20 * 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "random:0:1"], "--workload"),
        (["--requests", "0"], "--requests"),
        (["--concurrency", "0"], "--concurrency"),
        (["--request-rate", "0"], "--request-rate"),
        (["--requests", "1000000000"], "--requests"),
        (["--compute-efficiency", "0"], "--compute-efficiency"),
        (["--compute-efficiency", "1.5"], "--compute-efficiency"),
        (["--compute-efficiency", "nan"], "--compute-efficiency"),
    ],
)
def test_simulate_refuses_bad_arguments(args, message):
    code, _, err = _simulate("-f", str(EXAMPLES / "tiny-sim.yaml"), *args)
    assert code == 2 and message in err


def test_requests_longer_than_the_model_are_refused_before_running():
    code, _, err = _simulate(
        "-f", str(EXAMPLES / "tiny-sim.yaml"), "--workload", "random:100000000:10"
    )  # fmt: skip
    assert code == 1 and "maxModelLen" in err and "100000010 tokens" in err


def test_compute_efficiency_slows_compute_bound_prefill_and_leaves_the_rest():
    """One long prompt on the Qwen3-235B example is compute-bound: at half the peak FLOPs its
    compute part takes twice as long, while the collectives and HBM time do not change."""

    def ttft(efficiency: str) -> float:
        code, out, err = _simulate(
            "-f", str(EXAMPLES / "qwen3-235b-w8a8.yaml"), "--workload", "fixed:16384:1",
            "--requests", "1", "--compute-efficiency", efficiency,
        )  # fmt: skip
        assert code == 0, err
        return float(next(line for line in out.splitlines() if "Mean TTFT" in line).split()[-1])

    full, half, tenth = ttft("1"), ttft("0.5"), ttft("0.1")
    assert full < half < tenth
    # T = C + F/e with the compute part F > 0: e=1 -> C+F, e=0.5 -> C+2F, e=0.1 -> C+10F.
    compute = half - full
    assert compute > 0
    assert tenth == pytest.approx(full + 9 * compute, rel=0.02)


def test_a_next_turn_waits_for_the_previous_one_and_reuses_its_cache():
    """Two-turn conversation on a prefix-caching engine: turn 2 is issued only once turn 1
    has finished, and finds turn 1's prompt and answer cached."""
    settings = SimSettings(block_size=4, num_blocks=64, max_num_seqs=4,
                           max_num_batched_tokens=64, prefill_tokens_per_second=1000.0,
                           decode_step_seconds=0.01, prefix_caching=True)  # fmt: skip
    run = VirtualRun({"unified": (settings, 1)})
    turn1 = list(range(1, 21))
    turn2 = turn1 + [0] * 5 + [7, 8, 9]
    done = run.run([(20, 5), (28, 3)], None, math.inf, prompts=[turn1, turn2], after=[None, 0])
    first, second = done
    assert second.issued >= first.token_times[-1]
    cache = run.engines[0][1].cache
    assert cache.hit_tokens == 24  # 24 of turn 1's 24 KV tokens (20 prompt + 4 fed answers)
