"""`ascend-serve simulate`: a ModelDeployment's planned instances on the sim engine's virtual
clock, under a `vllm bench serve`-shaped load, printed as that benchmark prints it."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

from ascend_runtime.roles import Role
from ascend_runtime.sim.latency import kv_transfer_seconds
from ascend_runtime.sim.virtual import VirtualRun, Workload, summarize

from .planner.results import Plan

MAX_REQUESTS = 100_000
"""More requests than any benchmark needs; each costs memory and time even on the virtual
clock."""

ROWS = [
    ("Successful requests", "completed", "{:.0f}"),
    ("Benchmark duration (s)", "duration", "{:.2f}"),
    ("Total input tokens", "total_input_tokens", "{:.0f}"),
    ("Total generated tokens", "total_output_tokens", "{:.0f}"),
    ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("Output token throughput (tok/s)", "output_throughput", "{:.2f}"),
    ("Total token throughput (tok/s)", "total_token_throughput", "{:.2f}"),
    *(
        (f"{stat.capitalize()} {metric.upper()} (ms)", f"{stat}_{metric}_ms", "{:.2f}")
        for metric in ("ttft", "tpot", "itl")
        for stat in ("mean", "median", "p99")
    ),
    ("Mean KV cache usage", "mean_kv_cache_usage", "{:.1%}"),
    ("Peak KV cache usage", "max_kv_cache_usage", "{:.1%}"),
    ("Preemptions", "preemptions", "{:.0f}"),
]


def add_parser(sub: Any, with_file: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="predict vllm bench serve's numbers for a spec on the sim engine's virtual clock",
    )
    with_file(p)
    p.add_argument(
        "--workload",
        default="random:3584:1536",
        help="random:IN:OUT[:RANGE_RATIO] (vLLM's random dataset) or fixed:IN:OUT",
    )
    p.add_argument("--requests", type=int, default=720, help="number of requests (num-prompts)")
    p.add_argument("--concurrency", type=int, help="most requests in flight (max-concurrency)")
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second, Poisson arrivals (default: all at once)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_efficiency_argument(p)
    p.add_argument("--json", dest="json_path", help="write the result with vllm bench's keys")
    p.set_defaults(func=cmd_simulate)


def add_efficiency_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compute-efficiency",
        type=float,
        default=1.0,
        help="achieved fraction of peak FLOPs (default 1: the roofline); calibrate it with "
        "one prefill time measured on your NPUs (docs/sim.md)",
    )


def check_efficiency(value: float) -> None:
    """--compute-efficiency must be a fraction in (0, 1]."""
    from .cli import UsageError

    if not 0 < value <= 1:
        raise UsageError(
            f"--compute-efficiency must be above 0 and at most 1 (got {value}); it scales "
            "the peak FLOPs, e.g. 0.3 for 30% of peak"
        )


def roles_of(plan: Plan, compute_efficiency: float = 1.0) -> dict[str, tuple[Any, int]]:
    """Role -> (sim settings of one instance, instance count), as `simulate` runs them, the
    step model's FLOP rates scaled by `compute_efficiency`."""
    roles = {}
    for r in sorted(plan.roles, key=lambda r: r.name != Role.PREFILL):
        if r.instances <= 0:
            continue
        settings = r.runtime_config.sim
        model = settings.step_model
        if model is not None and compute_efficiency != 1.0:
            model = model.model_copy(update={
                "matmul_flops_per_second": model.matmul_flops_per_second * compute_efficiency,
                "attention_flops_per_second": model.attention_flops_per_second
                * compute_efficiency,
            })  # fmt: skip
            settings = settings.model_copy(update={"step_model": model})
        roles[r.name] = (settings, r.instances)
    return roles


def simulate_plan(
    plan: Plan,
    workload: Workload,
    requests: int,
    concurrency: int | None,
    *,
    request_rate: float = math.inf,
    seed: int = 0,
    compute_efficiency: float = 1.0,
) -> dict[str, Any]:
    """Run the benchmark on the plan's instances; vllm bench's result keys."""
    import random

    roles = roles_of(plan, compute_efficiency)
    if not roles:
        raise ValueError("the deployment has no instances to simulate (replicas: 0)")
    longest = max(settings.max_model_len for settings, _ in roles.values())
    top = workload.longest
    if top > longest:
        raise ValueError(
            f"--workload reaches {top} tokens (prompt + output) and the model's length is "
            f"{longest}: vLLM would refuse those requests; shorten the workload or raise "
            "spec.model.maxModelLen"
        )
    lengths = workload.draw(random.Random(seed), requests)
    prefill = roles.get(Role.PREFILL)
    model = prefill[0].step_model if prefill else None
    transfer = (lambda tokens: kv_transfer_seconds(model, tokens)) if model else 0.0
    run = VirtualRun(roles, kv_transfer_seconds=transfer)
    done = run.run(lengths, concurrency, request_rate, seed)
    return summarize(run, done)


def cmd_simulate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .cli import UsageError, _plans

    try:
        workload = Workload.parse(args.workload)
    except ValueError as exc:
        raise UsageError(f"--workload: {exc}") from None
    if not 1 <= args.requests <= MAX_REQUESTS:
        raise UsageError(f"--requests must be between 1 and {MAX_REQUESTS}")
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if not args.request_rate > 0:
        raise UsageError("--request-rate must be above 0 (inf: all at once)")
    check_efficiency(args.compute_efficiency)
    plans = _plans(args, out, err)
    if plans is None:
        return 1
    results = []
    for plan in plans:
        started = time.perf_counter()
        try:
            result = simulate_plan(
                plan,
                workload,
                args.requests,
                args.concurrency,
                request_rate=args.request_rate,
                seed=args.seed,
                compute_efficiency=args.compute_efficiency,
            )
        except (ValueError, RuntimeError) as exc:
            err.write(f"error: {plan.name}: {exc}\n")
            return 1
        wall = time.perf_counter() - started
        result |= {
            "model_id": plan.spec.model.name,
            "num_prompts": args.requests,
            "max_concurrency": args.concurrency,
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "workload": args.workload,
            "compute_efficiency": args.compute_efficiency,
            "simulated_in_seconds": round(wall, 2),
        }
        out.write(f"{'=' * 14} Simulated serving benchmark: {plan.namespace}/{plan.name} ")
        out.write(f"{'=' * 14}\n")
        for label, key, fmt in ROWS:
            out.write(f"{label + ':':<40}{fmt.format(result[key]):>12}\n")
        out.write(f"(simulated {args.requests} requests in {wall:.1f} s of wall time)\n")
        results.append(result)
    if args.json_path:
        payload = results[0] if len(results) == 1 else results
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
