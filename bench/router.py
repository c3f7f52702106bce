"""Router overhead: requests/s and latency through the router vs straight to the engines.

Starts sim engines with zero latency and a router in front of them (real processes on
loopback), then, in one run and side by side, at each concurrency level (1, 64, 256 by
default): the same closed-loop load directly (round robin over the engines) and through the
router, in alternating rounds (the throughput ratio is the median of the rounds'), then the same
paced load on both (half the closed loop's throughput, at most that many in flight: the p50/p99
the router adds). Writes JSON under bench/results/.

    python bench/router.py [--seconds 12] [--rounds 4] [--engines 2] [--concurrency 1 64 256]
    python bench/router.py --task stream     # streamed (bench/results/router_stream.json)
    python bench/router.py --task embed      # /v1/embeddings (bench/results/router_embed.json)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT / "tests")]

from _common import cpu_device, write_result  # noqa: E402

from ascend_operator.planner import plan_manifest  # noqa: E402
from procs import cli, free_port, wait_healthy  # noqa: E402

SPEC = {
    "apiVersion": "ascendserve.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "bench"},
    "spec": {
        "model": {
            "name": "bench",
            "source": {"hostPath": {"path": "/m"}},
            "maxModelLen": 4096,
            "architecture": {"preset": "tiny"},
        },
        "runtime": {
            "engine": "sim",
            "maxNumSeqs": 512,
            "maxNumBatchedTokens": 8192,
            "sim": {"fixedTtftMs": 0, "fixedItlMs": 0},
        },
        "roles": [{"name": "unified"}],
    },
}
BODY = {
    "model": "bench",
    "prompt": "measure the router overhead please",
    "max_tokens": 8,
    "temperature": 0,
}
EMBED_BODY = {"model": "bench", "input": ["measure the router overhead please", "and again"]}
TASKS = {
    # task: (path, body, spec patch for the model and runtime)
    "generate": ("/v1/completions", BODY, {}),
    "stream": ("/v1/completions", {**BODY, "stream": True}, {}),
    "embed": ("/v1/embeddings", EMBED_BODY, {"task": "embed"}),
}


async def load(
    urls: list[str], concurrency: int, seconds: float, task: str = "generate",
    rate: float | None = None,
) -> dict[str, float]:  # fmt: skip
    """Closed loop: `concurrency` workers each send the next request when one returns. With
    `rate`: open loop instead, a request every 1/rate seconds (at most `concurrency` in
    flight), so both paths see the same offered load and latency is not queueing at a
    saturated engine."""
    latencies: list[float] = []
    errors = 0
    targets = itertools.cycle(urls)
    path, body, _ = TASKS[task]
    deadline = time.perf_counter() + seconds
    began = time.perf_counter()
    # aiohttp as the load generator: httpx's pool cannot drive more than ~200 req/s at
    # 64 concurrent requests here, which would measure the client, not the router.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one() -> None:
            nonlocal errors
            start = time.perf_counter()
            async with client.post(f"{next(targets)}{path}", json=body) as r:
                await r.read()
                ok = r.status == 200
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await one()

        async def paced(period: float) -> None:
            slots, tasks = asyncio.Semaphore(concurrency), []
            next_at = time.perf_counter()

            async def run() -> None:
                try:
                    await one()
                finally:
                    slots.release()

            while next_at < deadline:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                await slots.acquire()
                tasks.append(asyncio.create_task(run()))
                next_at += period
            await asyncio.gather(*tasks)

        began = time.perf_counter()
        if rate:
            await paced(1.0 / rate)
        else:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def measure(engines: list[str], router: str, concurrency: int, args: argparse.Namespace) -> dict:
    """One concurrency level: `rounds` alternating rounds of direct and routed load (direct
    first in even rounds, the router first in odd ones, so drift on a shared machine falls on
    both paths); the ratio and the added latencies are medians over the rounds."""
    seconds = args.seconds / args.rounds
    asyncio.run(load(engines, concurrency, 1.0, args.task))  # warm up connections
    asyncio.run(load([router], concurrency, 1.0, args.task))

    def pair(rate: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
        runs = {}
        order = ("direct", "router") if len(rounds) % 2 == 0 else ("router", "direct")
        for path in order:
            urls = engines if path == "direct" else [router]
            runs[path] = asyncio.run(load(urls, concurrency, seconds, args.task, rate))
        return runs["direct"], runs["router"]

    rounds: list[dict] = []
    for _ in range(args.rounds):
        direct, routed = pair()
        rounds.append({"direct": direct, "router": routed, "ratio": routed["rps"] / direct["rps"]})
    direct = merge([r["direct"] for r in rounds])
    routed = merge([r["router"] for r in rounds])
    # the same offered load on both paths: a fraction of what the slower one sustained
    rate = args.paced_fraction * min(direct["rps"], routed["rps"])
    paced: list[dict] = []
    for _ in range(args.rounds):
        p_direct, p_router = pair(rate)
        paced.append({"direct": p_direct, "router": p_router})
    return {
        "concurrency": concurrency,
        "direct": direct,
        "router": routed,
        "throughput_ratio": statistics.median(r["ratio"] for r in rounds),
        "round_ratios": [r["ratio"] for r in rounds],
        "closed_loop_p50_difference_ms": routed["p50_ms"] - direct["p50_ms"],
        "paced": {
            "rate_rps": rate,
            "direct": merge([p["direct"] for p in paced]),
            "router": merge([p["router"] for p in paced]),
            "added_p50_ms": statistics.median(
                p["router"]["p50_ms"] - p["direct"]["p50_ms"] for p in paced
            ),
            "added_p99_ms": statistics.median(
                p["router"]["p99_ms"] - p["direct"]["p99_ms"] for p in paced
            ),
        },
    }


def merge(runs: list[dict[str, float]]) -> dict[str, float]:
    """Several rounds of one path as one: totals, mean rate, median of the rounds' p50/p99."""
    return {
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "rps": statistics.fmean(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let client, engines and router share every core (default: the router gets its "
        "own cores, as it has its own pod in a cluster, and the client and engines keep the "
        "same cores in both runs)",
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="generate",
        help="completions (generate), streamed completions (stream) or embeddings (embed)",
    )
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="the paced run offers this fraction of the closed loop's throughput (default 0.5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="alternating direct/router rounds per point, `--seconds` split among them",
    )
    parser.add_argument("--output", help="default: bench/results/router[_embed].json")
    args = parser.parse_args()
    suffix = "" if args.task == "generate" else f"_{args.task}"
    output = args.output or str(ROOT / "bench" / "results" / f"router{suffix}.json")

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    router_cpus = set(cpus[len(cpus) // 2 :]) if pin else set(cpus)
    other_cpus = set(cpus[: len(cpus) // 2]) if pin else set(cpus)
    if pin:
        os.sched_setaffinity(0, other_cpus)  # the load generator
    spec = SPEC
    if args.task == "embed":
        spec = {**SPEC, "spec": {**SPEC["spec"]}}
        spec["spec"]["model"] = {**SPEC["spec"]["model"], **TASKS["embed"][2]}
        spec["spec"]["runtime"] = {**SPEC["spec"]["runtime"], "cudagraphMode": "PIECEWISE"}
    plan = plan_manifest(spec)
    work = Path(tempfile.mkdtemp(prefix="bench-router-"))
    config = work / "unified.json"
    config.write_text(plan.role("unified").runtime_config.model_dump_json())
    ports = [free_port() for _ in range(args.engines)]
    engines = [f"http://127.0.0.1:{p}" for p in ports]
    router_port = free_port()
    router_cfg = plan.router.config.model_copy(
        update={
            "backends": plan.router.config.backends.model_copy(
                update={"source": "static", "static": {"unified": engines}}
            ),
            "max_concurrent_requests": 100000,
        }
    )
    (work / "router.json").write_text(router_cfg.model_dump_json())
    procs = [
        subprocess.Popen(
            cli("sim", "--config", str(config), "--host", "127.0.0.1", "--port", str(p)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    procs.append(
        subprocess.Popen(
            cli(
                "router",
                "--config",
                str(work / "router.json"),
                "--host",
                "127.0.0.1",
                "--port",
                str(router_port),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    for proc in procs[:-1]:
        os.sched_setaffinity(proc.pid, other_cpus)
    os.sched_setaffinity(procs[-1].pid, router_cpus)
    router = f"http://127.0.0.1:{router_port}"
    try:
        for url in [*engines, router]:
            wait_healthy(url)
        rows = []
        for concurrency in args.concurrency:
            rows.append(measure(engines, router, concurrency, args))
            row = rows[-1]
            print(
                f"c={concurrency:<4} closed loop: direct {row['direct']['rps']:7.1f} req/s, "
                f"router {row['router']['rps']:7.1f} req/s, ratio {row['throughput_ratio']:.3f}"
                f" | paced at {row['paced']['rate_rps']:6.1f} req/s: p50 direct "
                f"{row['paced']['direct']['p50_ms']:6.2f} ms, router "
                f"{row['paced']['router']['p50_ms']:6.2f} ms, added p50 "
                f"{row['paced']['added_p50_ms']:+.2f} ms "
                f"p99 {row['paced']['added_p99_ms']:+.2f} ms",
                flush=True,
            )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    result = {
        "benchmark": "router",
        "device": cpu_device("client, router and engines share them"),
        "engines": args.engines,
        "cpu_pinning": (
            f"router on CPUs {sorted(router_cpus)}, client and engines on {sorted(other_cpus)}"
        )
        if pin
        else "none (all processes share CPUs)",
        "seconds_per_point": args.seconds,
        "rounds": args.rounds,
        "task": args.task,
        "request": {"path": TASKS[args.task][0], "body": TASKS[args.task][1]},
        "goal": "closed loop: router throughput >= 0.9 x direct; paced (same offered load on "
        "both paths, at most `concurrency` in flight): added p50 < 2 ms at concurrency 64",
        "method": "closed loop for throughput (at saturation its latency is queueing at the "
        "engines, so the p50 difference there measures nothing of the router); paced for the "
        "latency the router adds",
        "results": rows,
    }
    write_result(output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
