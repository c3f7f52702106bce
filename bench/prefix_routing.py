"""Prefix-aware routing on the sim's virtual clock: round-robin, least-outstanding, and the
kv-aware policy in its approximate (routing history) and precise (the engines' KV events) modes,
side by side in one run over the same sim instances with the physical latency model and
prefix caching on. Two workloads: many users sharing a few long system prompts in multi-turn
conversations, and one with no shared prefixes. Reports output tok/s, mean and p99 TTFT, the
cache hit rate, the oracle hit rate (one LRU cache of all instances' capacity together, fed
the same requests in the same order: what no router can beat by placement alone), decisions
by reason and the kv-aware decision time.

    python bench/prefix_routing.py [--output bench/results/prefix_routing.json]
    python bench/prefix_routing.py --tiny        # CI: a few conversations
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _common import cpu_device, write_result  # noqa: E402

from ascend_operator.planner import plan_manifest  # noqa: E402
from ascend_operator.simulate import roles_of  # noqa: E402
from ascend_runtime.kv.block_hash import block_hashes  # noqa: E402
from ascend_runtime.router.prefix_index import KvAwarePolicy  # noqa: E402
from ascend_runtime.sim.prefix_cache import PrefixCachePool  # noqa: E402
from ascend_runtime.sim.virtual import VirtualRun, summarize  # noqa: E402

VOCAB = 151_000
DECODE_WEIGHT = 0.25


def spec(instances: int, kv_blocks: int, block_size: int) -> dict[str, Any]:
    return {
        "apiVersion": "ascendserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "prefix", "namespace": "bench"},
        "spec": {
            "model": {"name": "qwen3-8b", "source": {"pvc": {"claimName": "m", "path": "q"}},
                      "maxModelLen": 32768, "architecture": {"preset": "qwen3-8b"}},
            "runtime": {"engine": "sim", "prefixCaching": True, "blockSize": block_size,
                        "maxNumSeqs": 64, "maxNumBatchedTokens": 8192,
                        **({"sim": {"kvCacheBlocks": kv_blocks}} if kv_blocks else {})},
            "hardware": {"profile": "A3"},
            "roles": [{"name": "unified", "parallelism": {"tensor": 1}}],
            "replicas": instances,
        },
    }  # fmt: skip


def shared_workload(
    rng: random.Random, prefixes: int, conversations: int, turns: int, prefix_len: tuple[int, int]
) -> tuple[list[list[int]], list[tuple[int, int]], list[int | None]]:
    """Conversations over a few system prompts: turn k's prompt is turn k-1's prompt, its
    answer (the sim answers with token 0s) and a new user message."""

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    systems = [tokens(rng.randint(*prefix_len)) for _ in range(prefixes)]
    prompts, lengths, after = [], [], []
    for _ in range(conversations):
        prompt, previous = list(rng.choice(systems)), None
        for _ in range(turns):
            prompt = prompt + tokens(rng.randint(64, 512))
            out = rng.randint(64, 256)
            prompts.append(prompt)
            lengths.append((len(prompt), out))
            after.append(previous)
            previous = len(prompts) - 1
            prompt = prompt + [0] * out
    return prompts, lengths, after


def unique_workload(
    rng: random.Random, requests: int, prompt_len: tuple[int, int]
) -> tuple[list[list[int]], list[tuple[int, int]], list[int | None]]:
    prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(*prompt_len))]
               for _ in range(requests)]  # fmt: skip
    return prompts, [(len(p), rng.randint(64, 256)) for p in prompts], [None] * requests


class Router:
    """One policy over the run's instances (engine indexes as instance names); kv-aware is
    the router's own KvAwarePolicy, fed in precise mode by the engines' KV events. In PD it
    places the decode too (by prefix unless `decode_by_prefix` is off: then by load)."""

    def __init__(
        self, run: VirtualRun, policy: str, block_size: int, capacity: int,
        decode_by_prefix: bool = True,
    ):  # fmt: skip
        self.run, self.policy, self.block_size = run, policy, block_size
        self.decode_by_prefix = decode_by_prefix
        self.turn = itertools.count()
        mode = "approximate" if policy == "kv-aware-approx" else "precise"
        self.kv = KvAwarePolicy(mode=mode, capacity=capacity, decode_weight=DECODE_WEIGHT)
        self.decision_us: list[float] = []
        if policy == "kv-aware-precise":
            for i, (_, engine) in enumerate(run.engines):
                engine.cache.listeners.append(lambda e, name=str(i): self.kv.apply(name, [e]))

    def pick(self, role: str, prompt: list[int], candidates: list[int]) -> int:
        if self.policy == "round-robin":
            return candidates[next(self.turn) % len(candidates)]
        if self.policy == "least-outstanding" or (role == "decode" and not self.decode_by_prefix):
            return min(candidates, key=self.run.load)
        started = time.perf_counter()
        hashes = block_hashes(prompt, self.block_size)
        names = [str(i) for i in candidates]
        busy = {n: float(self.run.engines[int(n)][1].pool.used) for n in names}
        for n in names:  # the virtual run reads each instance's KV usage at every decision
            self.kv.read(n)
        choice = self.kv.choose((role, id(prompt)), hashes, names, busy)
        self.decision_us.append(1e6 * (time.perf_counter() - started))
        return int(choice.instance)

    def first_token(self, index: int, prompt: list[int]) -> None:
        self.kv.prefilled((self.run.engines[index][0], id(prompt)))

    def done(self, index: int, prompt: list[int]) -> None:
        if self.policy.startswith("kv-aware"):
            self.kv.finished((self.run.engines[index][0], id(prompt)))


def oracle_hit_rate(
    requests: list[Any], total_blocks: int, block_size: int
) -> float:  # fmt: skip
    """One LRU prefix cache of every instance's blocks, fed the requests in issue order."""
    pool = PrefixCachePool(total_blocks, block_size)
    hit = queried = 0
    for r in sorted(requests, key=lambda r: (r.issued, r.index)):
        tokens = r.prompt + [0] * r.output_len
        hashes = block_hashes(tokens, block_size)
        limit = (len(r.prompt) - 1) // block_size
        cached = pool.match(hashes[:limit])
        hit += len(cached) * block_size
        queried += len(r.prompt)
        pool.take(cached)
        fresh = pool.allocate(min(len(hashes) - len(cached), pool.free)) or []
        blocks = cached + fresh
        pool.store(blocks, hashes[: len(blocks)], None, lambda i: [])
        pool.release(blocks)
    return hit / queried if queried else 0.0


POLICIES = ["round-robin", "least-outstanding", "kv-aware-approx", "kv-aware-precise"]


def run_policy(
    policy: str, plan: Any, workload: tuple[Any, Any, Any], concurrency: int,
    compute_efficiency: float,
) -> tuple[dict[str, Any], list[Any]]:  # fmt: skip
    prompts, lengths, after = workload
    roles = roles_of(plan, compute_efficiency)
    settings = roles["unified"][0]
    run = VirtualRun(roles)
    run.router = Router(run, policy, settings.block_size, settings.num_blocks)
    started = time.perf_counter()
    done = run.run(lengths, concurrency, float("inf"), prompts=prompts, after=after)
    wall = time.perf_counter() - started
    result = summarize(run, done)
    caches = [engine.cache for _, engine in run.engines]
    queried = sum(c.queried_tokens for c in caches)
    router = run.router
    row = {
        "policy": policy,
        "output_throughput": round(result["output_throughput"], 1),
        "mean_ttft_ms": round(result["mean_ttft_ms"], 1),
        "p99_ttft_ms": round(result["p99_ttft_ms"], 1),
        "mean_tpot_ms": round(result["mean_tpot_ms"], 2),
        "hit_rate": round(sum(c.hit_tokens for c in caches) / queried, 4) if queried else 0.0,
        "hit_rate_per_instance": [
            round(c.hit_tokens / max(1, c.queried_tokens), 3) for c in caches
        ],
        "preemptions": result["preemptions"],
        "decisions": router.kv.reasons,
        "decision_p50_us": round(statistics.median(router.decision_us), 1)
        if router.decision_us
        else None,
        "simulated_in_seconds": round(wall, 2),
    }
    return row, done


def decision_overhead(block_size: int, case: str, prompt_tokens: int = 8192,
                      instances: int = 8, calls: int = 200) -> dict[str, Any]:  # fmt: skip
    """What one kv-aware decision costs the router on an 8k-token prompt, through the
    router's own code (KvRouting: parse the prompt, tokenize with the sim engines' tokenizer,
    hash, choose among `instances` pool members, settle), against an index holding 16 long
    prefixes on every instance. `conversation`: a chat request whose 8k-token system prompt
    the router has seen before, plus a new 200-token question; `fresh`: a completion prompt of
    8k tokens nobody sent before (the worst case)."""
    from ascend_runtime.config import KvAwareRouting, RouterBackends
    from ascend_runtime.router.kv_routing import KvRouting
    from ascend_runtime.router.metrics import RouterMetrics
    from ascend_runtime.router.pool import Pool
    from ascend_runtime.sim import model

    rng = random.Random(1)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(50_000)}" for _ in range(n))

    system = words(prompt_tokens)
    settings = KvAwareRouting(mode="precise", block_size=block_size, kv_blocks={"unified": 512})
    kv = KvRouting(settings, RouterBackends(source="static"), RouterMetrics())
    pool = Pool(policy="kv-aware", listeners=[kv])
    names = [f"http://10.0.0.{i}:8000" for i in range(instances)]
    pool.set_members("unified", names)
    for i, backend in enumerate(pool.members("unified")):
        backend.kv_usage = i / 10
    system_hashes = block_hashes(model.tokenize(f"system: {system}"), block_size)
    for i, name in enumerate(names):
        for p in range(16):
            prefix = [rng.randrange(1, VOCAB) for _ in range(8192)] if p else None
            hashes = block_hashes(prefix, block_size) if prefix else system_hashes
            kv.policy.index.stored(name, hashes[: 8 + i])
    if case == "conversation":
        bodies = [("/v1/chat/completions", {"messages": [
            {"role": "system", "content": system}, {"role": "user", "content": words(200)}
        ]}) for _ in range(calls + 1)]  # fmt: skip
    else:
        bodies = [("/v1/completions", {"prompt": words(prompt_tokens)}) for _ in range(calls + 1)]
    timings = []
    for route, body in bodies:
        started = time.perf_counter()
        affinity = kv.local_affinity("unified", route, body)
        assert affinity is not None and pool.pick("unified", chooser=affinity) is not None
        affinity.settle()
        timings.append(time.perf_counter() - started)
    timings = timings[1:]  # the first call of `conversation` hashes the system prompt
    return {
        "case": case, "prompt_tokens": prompt_tokens + (200 if case == "conversation" else 0),
        "block_size": block_size, "instances": instances,
        "p50_us": round(1e6 * statistics.median(timings), 1),
        "p99_us": round(1e6 * sorted(timings)[int(0.99 * (len(timings) - 1))], 1),
    }  # fmt: skip


def compare(rows: list[dict[str, Any]], oracle: float) -> None:
    """Ratios against round-robin and least-outstanding (the first two rows), in place."""
    rr, lo = rows[0], rows[1]
    for row in rows:
        row["throughput_vs_round_robin"] = round(
            row["output_throughput"] / rr["output_throughput"], 3
        )
        row["throughput_vs_least_outstanding"] = round(
            row["output_throughput"] / lo["output_throughput"], 3
        )
        row["mean_ttft_reduction_vs_round_robin"] = round(
            rr["mean_ttft_ms"] / max(row["mean_ttft_ms"], 1e-9), 2
        )
        row["hit_rate_vs_oracle"] = round(row["hit_rate"] / oracle, 3) if oracle else None


def regime(
    plan: Any, workloads: dict[str, Any], concurrency: int, efficiency: float, *,
    oracle_blocks: int, block_size: int,
) -> dict[str, Any]:  # fmt: skip
    """Every policy on every workload at one concurrency and compute efficiency."""
    print(f"\n== concurrency {concurrency}, compute efficiency {efficiency}")
    results = {}
    for name, workload in workloads.items():
        rows, oracle = [], 0.0
        for policy in POLICIES:
            row, done = run_policy(policy, plan, workload, concurrency, efficiency)
            if not rows:
                oracle = oracle_hit_rate(done, oracle_blocks, block_size)
            rows.append(row)
        compare(rows, oracle)
        print(f"{name} ({len(workload[0])} requests; oracle hit rate {oracle:.3f})")
        for row in rows:
            print(f"  {row['policy']:18s} {row['output_throughput']:9.1f} tok/s "
                  f"(x{row['throughput_vs_round_robin']:.2f} RR, "
                  f"x{row['throughput_vs_least_outstanding']:.2f} LO)  TTFT mean "
                  f"{row['mean_ttft_ms']:9.1f} p99 {row['p99_ttft_ms']:9.1f} ms  hit "
                  f"{row['hit_rate']:.3f} ({row['hit_rate_vs_oracle']} of oracle)  "
                  f"{row['decisions']}")  # fmt: skip
        results[name] = {"requests": len(workload[0]), "oracle_hit_rate": round(oracle, 4),
                         "rows": rows}  # fmt: skip
    return {"concurrency": concurrency, "compute_efficiency": efficiency, "workloads": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "prefix_routing.json"))
    parser.add_argument("--tiny", action="store_true", help="a few conversations (CI)")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument(
        "--regimes",
        default="64:1,128:1,256:1,64:0.1688,128:0.1688,256:0.1688",
        help="CONCURRENCY:COMPUTE_EFFICIENCY,... (0.1688: docs/sim.md's calibrated prefill)",
    )
    parser.add_argument(
        "--kv-tokens",
        type=int,
        default=65536,
        help="KV capacity per instance (0: what the plan gives the model)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    block_size = 128
    instances = 4 if args.tiny else args.instances
    conversations, prefixes = (16, 4) if args.tiny else (512, 16)
    regimes = [(8, 1.0)] if args.tiny else [
        (int(c), float(e)) for c, e in (r.split(":") for r in args.regimes.split(","))
    ]  # fmt: skip
    plan = plan_manifest(spec(instances, args.kv_tokens // block_size, block_size))
    kv_blocks = roles_of(plan)["unified"][0].num_blocks
    rng = random.Random(args.seed)
    workloads = {
        "shared-prefixes": shared_workload(rng, prefixes, conversations, 3, (2048, 8192)),
        "no-shared-prefixes": unique_workload(rng, conversations, (2048, 8192)),
    }
    print(f"{instances} sim instances (qwen3-8b, A3, TP1, physical latency model, prefix "
          f"caching), KV {kv_blocks * block_size} tokens each")  # fmt: skip
    runs = [
        regime(plan, workloads, c, e, oracle_blocks=instances * kv_blocks, block_size=block_size)
        for c, e in regimes
    ]
    overhead = [
        decision_overhead(bs, case, calls=20 if args.tiny else 200)
        for case in ("conversation", "fresh") for bs in (128, 16)
    ]  # fmt: skip
    for o in overhead:
        print(f"kv-aware decision ({o['case']}), {o['prompt_tokens']}-token prompt, block "
              f"{o['block_size']}, {o['instances']} instances: p50 {o['p50_us']} us, "
              f"p99 {o['p99_us']} us")  # fmt: skip
    write_result(
        args.output,
        {
            "benchmark": "prefix_routing",
            "device": cpu_device("the sim's virtual clock; no NPU"),
            "tiny": args.tiny,
            "instances": instances,
            "kv_tokens_per_instance": kv_blocks * block_size,
            "workloads": {
                "shared-prefixes": f"{prefixes} system prompts of 2-8k tokens, {conversations} "
                "conversations of 3 turns (user 64-512, answers 64-256 tokens)",
                "no-shared-prefixes": f"{conversations} prompts of 2-8k random tokens",
            },
            "regimes": runs,
            "decision_overhead": overhead,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
