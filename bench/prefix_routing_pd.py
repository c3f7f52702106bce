"""Kv-aware routing with prefill/decode disaggregation on the sim's virtual clock: prefill and
decode sim instances with the physical latency model, prefix caching on both, the KV transfer
timed by the model's KV bytes over the link (only what the decode instance does not cache
travels). Shared-prefix conversations (bench/prefix_routing.py's workload) under round-robin,
least-outstanding, kv-aware with the decode placed by load (the prefill by prefix), and
kv-aware placing both by prefix, side by side in one run. Reports output tok/s, mean and p99
TTFT, each role's cache hit rate and the share of prompt KV that crossed the link.

    python bench/prefix_routing_pd.py [--output bench/results/prefix_routing_pd.json]
    python bench/prefix_routing_pd.py --tiny     # CI: a few conversations
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _common import cpu_device, write_result  # noqa: E402
from prefix_routing import Router, shared_workload, spec  # noqa: E402

from ascend_operator.planner import plan_manifest  # noqa: E402
from ascend_operator.simulate import roles_of  # noqa: E402
from ascend_runtime.sim.latency import kv_transfer_seconds  # noqa: E402
from ascend_runtime.sim.virtual import VirtualRun, summarize  # noqa: E402

POLICIES = [
    ("round-robin", "round-robin", True),
    ("least-outstanding", "least-outstanding", True),
    ("kv-aware, decode by load", "kv-aware-precise", False),
    ("kv-aware, decode by prefix", "kv-aware-precise", True),
]
"""(row name, router policy, whether the decode is placed by prefix)."""


def pd_spec(prefills: int, decodes: int, kv_blocks: int, block_size: int) -> dict[str, Any]:
    doc = spec(decodes, kv_blocks, block_size)
    doc["spec"]["roles"] = [
        {"name": "prefill", "replicas": prefills, "parallelism": {"tensor": 1}},
        {"name": "decode", "parallelism": {"tensor": 1}},
    ]
    return doc


def _hit_rate(caches: list[Any]) -> float:
    queried = sum(c.queried_tokens for c in caches)
    return round(sum(c.hit_tokens for c in caches) / queried, 4) if queried else 0.0


def run_policy(
    name: str, policy: str, by_prefix: bool, plan: Any, workload: tuple[Any, Any, Any], *,
    concurrency: int, efficiency: float,
) -> dict[str, Any]:  # fmt: skip
    prompts, lengths, after = workload
    roles = roles_of(plan, efficiency)
    settings = roles["prefill"][0]
    model = settings.step_model
    run = VirtualRun(roles, kv_transfer_seconds=lambda tokens: kv_transfer_seconds(model, tokens))
    run.router = Router(run, policy, settings.block_size, settings.num_blocks, by_prefix)
    started = time.perf_counter()
    done = run.run(lengths, concurrency, float("inf"), prompts=prompts, after=after)
    wall = time.perf_counter() - started
    result = summarize(run, done)
    caches = {role: [e.cache for r, e in run.engines if r == role]
              for role in ("prefill", "decode")}  # fmt: skip
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "policy": name,
        "output_throughput": round(result["output_throughput"], 1),
        "mean_ttft_ms": round(result["mean_ttft_ms"], 1),
        "p99_ttft_ms": round(result["p99_ttft_ms"], 1),
        "mean_tpot_ms": round(result["mean_tpot_ms"], 2),
        "prefill_hit_rate": _hit_rate(caches["prefill"]),
        "decode_hit_rate": _hit_rate(caches["decode"]),
        "kv_transferred_share": round(run.transferred_tokens / prompt_tokens, 4),
        "preemptions": result["preemptions"],
        "decisions": run.router.kv.reasons,
        "simulated_in_seconds": round(wall, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "bench" / "results" / "prefix_routing_pd.json"
    parser.add_argument("--output", default=str(default))
    parser.add_argument("--tiny", action="store_true", help="a few conversations (CI)")
    parser.add_argument("--prefills", type=int, default=4)
    parser.add_argument("--decodes", type=int, default=4)
    parser.add_argument(
        "--regimes",
        default="128:1,128:0.1688",
        help="CONCURRENCY:COMPUTE_EFFICIENCY,... (0.1688: docs/sim.md's calibrated prefill)",
    )
    parser.add_argument("--kv-tokens", type=int, default=65536, help="KV capacity per instance")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    block_size = 128
    prefills, decodes = (2, 2) if args.tiny else (args.prefills, args.decodes)
    conversations, prefixes = (16, 4) if args.tiny else (512, 16)
    regimes = [(8, 1.0)] if args.tiny else [
        (int(c), float(e)) for c, e in (r.split(":") for r in args.regimes.split(","))
    ]  # fmt: skip
    plan = plan_manifest(pd_spec(prefills, decodes, args.kv_tokens // block_size, block_size))
    workload = shared_workload(random.Random(args.seed), prefixes, conversations, 3, (2048, 8192))
    print(f"{prefills} prefill + {decodes} decode sim instances (qwen3-8b, A3, TP1, physical "
          f"latency model, prefix caching), {len(workload[0])} requests")  # fmt: skip
    runs = []
    for concurrency, efficiency in regimes:
        print(f"\n== concurrency {concurrency}, compute efficiency {efficiency}")
        rows = [
            run_policy(
                name,
                policy,
                by_prefix,
                plan,
                workload,
                concurrency=concurrency,
                efficiency=efficiency,
            )
            for name, policy, by_prefix in POLICIES
        ]
        base = rows[0]
        for row in rows:
            row["throughput_vs_round_robin"] = round(
                row["output_throughput"] / base["output_throughput"], 3
            )
            row["mean_ttft_reduction_vs_round_robin"] = round(
                base["mean_ttft_ms"] / max(row["mean_ttft_ms"], 1e-9), 2
            )
            print(f"  {row['policy']:27s} {row['output_throughput']:9.1f} tok/s "
                  f"(x{row['throughput_vs_round_robin']:.2f} RR)  TTFT mean "
                  f"{row['mean_ttft_ms']:9.1f} p99 {row['p99_ttft_ms']:9.1f} ms  hit prefill "
                  f"{row['prefill_hit_rate']:.3f} decode {row['decode_hit_rate']:.3f}  KV moved "
                  f"{row['kv_transferred_share']:.3f} of prompt tokens")  # fmt: skip
        runs.append({"concurrency": concurrency, "compute_efficiency": efficiency, "rows": rows})
    write_result(
        args.output,
        {
            "benchmark": "prefix_routing_pd",
            "device": cpu_device("the sim's virtual clock; no NPU"),
            "tiny": args.tiny,
            "prefill_instances": prefills,
            "decode_instances": decodes,
            "kv_tokens_per_instance": args.kv_tokens,
            "workload": f"{prefixes} system prompts of 2-8k tokens, {conversations} "
            "conversations of 3 turns (user 64-512, answers 64-256 tokens)",
            "regimes": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
