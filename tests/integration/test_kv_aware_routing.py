"""Policy kv-aware on real processes: `ascend-serve up` with three sim engines (our NPU
stand-in) publishing KV events over real ZMQ, and the real router following them. Requests
that share a system prompt go where it is cached; a second router started later learns every
instance's cache from the replay buffers before its first request."""

from __future__ import annotations

import random
import subprocess
import time

import httpx
import yaml

from helpers import load_example
from procs import cli, die_with_parent, free_port, up, wait_healthy

BLOCK = 16
PROMPTS = 3
QUESTIONS = 4


def _spec(tmp_path):
    spec = load_example("tiny-sim-kv-aware.yaml")
    spec["spec"]["runtime"]["blockSize"] = BLOCK
    path = tmp_path / "kv-aware.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _samples(url: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric family's samples."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def _ask(url: str, system: str, question: str, model: str = "tiny-kv") -> str:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_shared_prefixes_go_where_they_are_cached_and_a_new_router_knows_it(tmp_path):
    rng = random.Random(7)
    systems = [" ".join(f"s{p}w{rng.randrange(500)}" for _ in range(300)) for p in range(PROMPTS)]
    with up(_spec(tmp_path), tmp_path) as (url, _proc, _out):
        engines = [b["url"] for b in httpx.get(f"{url}/instances").json()["unified"]]
        assert len(engines) == 3
        answers = {}
        for q in range(QUESTIONS):
            for p, system in enumerate(systems):
                answers[p, q] = _ask(url, system, f"question {q} about prompt {p}")
        # a hit answers exactly as the miss did
        assert _ask(url, systems[0], "question 0 about prompt 0") == answers[0, 0]
        decisions = _samples(url, "ascend_serve_router_kv_decisions_total")
        assert decisions == {
            '{reason="load",role="unified"}': PROMPTS,
            '{reason="prefix",role="unified"}': PROMPTS * (QUESTIONS - 1) + 1,
        }, decisions
        # The engines agree: every repeat found its system prompt in that engine's cache.
        system_tokens = min(len(s.split()) for s in systems) // BLOCK * BLOCK
        hits = sum(sum(_samples(e, "vllm:prefix_cache_hits_total").values()) for e in engines)
        assert hits >= (PROMPTS * (QUESTIONS - 1) + 1) * system_tokens, hits
        held = _samples(url, "ascend_serve_router_kv_index_blocks")
        assert len(held) == PROMPTS  # each prompt on its own instance (load spread the misses)

        # A second router (a restart, or one more replica) over the same engines.
        port = free_port()
        second = subprocess.Popen(
            die_with_parent(cli("router", "--config", str(tmp_path / "router.json"),
                                "--host", "127.0.0.1", "--port", str(port))),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            other = f"http://127.0.0.1:{port}"
            wait_healthy(other, proc=second)
            deadline = time.monotonic() + 20
            while _samples(other, "ascend_serve_router_kv_index_blocks") != held:
                assert time.monotonic() < deadline, "the new router did not catch up"
                time.sleep(0.1)
            _ask(other, systems[1], "a new question")
            assert _samples(other, "ascend_serve_router_kv_decisions_total") == {
                '{reason="prefix",role="unified"}': 1
            }
        finally:
            second.terminate()
            second.wait(10)


def test_pd_places_prefill_and_decode_by_prefix(tmp_path):
    """PD: the router chooses the prefill instance that caches the prompt's prefix, then the
    decode instance that does (it pulls only the rest of the KV from the prefill)."""
    spec = load_example("tiny-sim-pd.yaml")
    spec["spec"]["runtime"]["blockSize"] = BLOCK
    spec["spec"]["router"] = {"policy": "kv-aware"}
    next(r for r in spec["spec"]["roles"] if r["name"] == "prefill")["replicas"] = 2
    path = tmp_path / "pd-kv.yaml"
    path.write_text(yaml.safe_dump(spec))
    rng = random.Random(9)
    systems = [" ".join(f"p{p}w{rng.randrange(500)}" for _ in range(200)) for p in range(2)]
    model = spec["spec"]["model"]["name"]
    with up(path, tmp_path) as (url, _proc, _out):
        members = httpx.get(f"{url}/instances").json()
        prefills = [b["url"] for b in members["prefill"]]
        decodes = [b["url"] for b in members["decode"]]
        answers = [
            _ask(url, systems[p], f"question {q}", model) for q in range(3) for p in range(2)
        ]
        assert answers[:2] == [_ask(url, systems[p], "question 0", model) for p in range(2)]
        assert _samples(url, "ascend_serve_router_kv_decisions_total") == {
            '{reason="load",role="prefill"}': 2,
            '{reason="prefix",role="prefill"}': 6,
            '{reason="load",role="decode"}': 2,
            '{reason="prefix",role="decode"}': 6,
        }
        for role in (prefills, decodes):
            hits = sum(sum(_samples(e, "vllm:prefix_cache_hits_total").values()) for e in role)
            assert hits >= 6 * (200 // BLOCK * BLOCK), hits
