"""`ascend-serve up` with real processes on loopback: unified and PD deployments answer,
agree with each other, survive a killed decode instance, and reject bad input cleanly."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from procs import engine_pids, up

PROMPTS = ["the quick brown fox", "Ascend NPU serving at scale", "one two three four five six"]


def complete(url: str, prompt: str, **kw) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(url: str, prompt: str, path: str = "/v1/completions", **kw) -> str:
    text, errors = stream(url, prompt, path, **kw)
    assert not errors, errors
    return text


def stream(url: str, prompt: str, path: str = "/v1/completions", **kw) -> tuple[str, list]:
    """Streamed text and any error events."""
    body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "stream": True, **kw}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    text, errors = [], []
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                    continue
                choice = event["choices"]
                if choice:
                    text.append(
                        choice[0].get("text") or choice[0].get("delta", {}).get("content") or ""
                    )
    return "".join(text), errors


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    with up("tiny-sim.yaml", tmp_path_factory.mktemp("unified")) as (url, _proc, _out):
        yield url


@pytest.fixture(scope="module")
def unified_outputs(unified):
    return {p: complete(unified, p)["choices"][0]["text"] for p in PROMPTS}


def test_unified_answers(unified, unified_outputs):
    for prompt, text in unified_outputs.items():
        assert len(text.split()) == 12
        assert stream_text(unified, prompt) == text


def test_pd_matches_unified_plain_and_streaming(tmp_path, unified_outputs, unified):
    with up("tiny-sim-pd.yaml", tmp_path) as (url, _proc, _out):
        for prompt, expected in unified_outputs.items():
            body = complete(url, prompt)
            assert body["choices"][0]["text"] == expected
            assert body["usage"]["completion_tokens"] == 12
            assert "kv_transfer_params" not in body
            assert stream_text(url, prompt) == expected
        chat = stream_text(url, "hello", "/v1/chat/completions")
        assert chat == stream_text(unified, "hello", "/v1/chat/completions")
        instances = httpx.get(f"{url}/instances").json()
        assert all(b["served"] > 0 for b in instances["prefill"])
        assert all(b["served"] > 0 for b in instances["decode"])


def _first_tokens(url: str) -> float:
    """Streams whose first token the router has relayed."""
    name = "ascend_serve_router_time_to_first_token_seconds_count "
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name))


def test_killed_decode_instance(tmp_path):
    import yaml

    from helpers import load_example

    spec = load_example("tiny-sim-pd.yaml")
    spec["spec"]["runtime"]["sim"] = {"fixedItlMs": 5}  # 400 tokens take 2 s
    path = tmp_path / "slow-pd.yaml"
    path.write_text(yaml.safe_dump(spec))
    with up(path, tmp_path) as (url, _proc, out), ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, url, "long request", max_tokens=400) for _ in range(4)]
        # Every stream under way on both decode instances: sent there, and its first token
        # relayed (before it, the router would retry a dead instance's request elsewhere).
        deadline = time.monotonic() + 30
        while True:
            decode = httpx.get(f"{url}/instances").json()["decode"]
            counts = sorted(b["outstanding"] for b in decode)
            if sum(counts) == 4 and counts[0] >= 1 and _first_tokens(url) == 4:
                break
            assert time.monotonic() < deadline, f"streams never spread over both: {counts}"
            time.sleep(0.05)
        os.kill(engine_pids(tmp_path)["decode-0-0"], signal.SIGKILL)
        # result() re-raises what failed in the worker thread; a hung request times out
        results = [f.result(timeout=30) for f in futures]
        failed = [errors for _, errors in results if errors]
        finished = [text for text, errors in results if not errors]
        # requests on the killed instance end with a clear error; the others complete
        assert failed and finished, results
        for errors in failed:
            assert "failed mid-stream" in errors[0]["message"]
            assert "response is incomplete" in errors[0]["message"]
        assert all(len(text.split()) == 400 for text in finished)
        for _ in range(6):  # new requests go to the surviving decode instance
            assert complete(url, "after the failure")["choices"][0]["text"]
        started = out.read_text()
        for name in ("prefill-0-0", "decode-0-0", "decode-1-0", "router"):
            assert f"ascend-serve up: {name} ready after" in started
        victim = tmp_path / "decode-0-0.log"
        deadline = time.time() + 10
        while "decode-0-0 exited" not in out.read_text() and time.time() < deadline:
            time.sleep(0.2)
        assert f"decode-0-0 exited with code -9; log: {victim}" in out.read_text()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{oops", 400, "not valid JSON"),
        (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "does not exist"),
        (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}).encode(), 400, "at least 1"),
        (
            json.dumps({"model": "tiny", "prompt": "x " * 4100}).encode(),
            400,
            "maximum context length",
        ),
        (b"x" * (5 * 1024 * 1024), 413, "exceeds the router's limit"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ],
)
def test_bad_input_through_router(unified, body, status, fragment):
    r = httpx.post(
        f"{unified}/v1/completions",
        content=body,
        headers={"content-type": "application/json", "x-request-id": "req-123"},
        timeout=30,
    )
    assert r.status_code == status
    assert fragment in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == status  # an integer, as vLLM sends it
    assert r.headers["x-request-id"] == "req-123"
    assert complete(unified, "still serving")["choices"][0]["text"]


def test_embeddings_through_the_router(tmp_path):
    """task: embed served by `up` (two sim instances behind the router): identical inputs
    give identical unit vectors whichever instance answers, batches keep their order, and
    bad input gets OpenAI-style 4xx errors."""
    import math

    with up("tiny-sim-embed.yaml", tmp_path) as (url, _proc, _out):

        def embed(body: dict) -> httpx.Response:
            return httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-embed", **body})

        texts = ["the quick brown fox", "jumps over", "the lazy dog"]
        batch = embed({"input": texts})
        assert batch.status_code == 200, batch.text
        vectors = [d["embedding"] for d in batch.json()["data"]]
        assert [d["index"] for d in batch.json()["data"]] == [0, 1, 2]
        for text, vector in zip(texts, vectors, strict=True):
            for _ in range(3):  # round-robin over both instances
                again = embed({"input": text}).json()["data"][0]["embedding"]
                assert again == vector
            assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-9)
        assert batch.json()["usage"]["prompt_tokens"] == 9
        for body, status in (
            ({"input": []}, 400),
            ({"input": [1.5]}, 400),
            ({"input": "word " * 600}, 400),
            ({"input": "x", "dimensions": 4096}, 400),
        ):
            r = embed(body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-embed", "prompt": "a"})
        assert r.status_code == 400 and "task: embed" in r.json()["error"]["message"]


def _processes_mentioning(text: str) -> set[int]:
    """Pids whose command line contains `text` (Linux /proc)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.add(int(entry))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc to find the engines")
def test_engines_die_with_a_killed_up(tmp_path):
    """SIGKILL gives `up` no chance to stop its engines; they must go anyway (Linux)."""
    with up("tiny-sim.yaml", tmp_path) as (_url, proc, _out):
        engines = _processes_mentioning(str(tmp_path / "unified.json"))
        assert len(engines) == 2, engines  # replicas: 2 in the example
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while _processes_mentioning(str(tmp_path / "unified.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_mentioning(str(tmp_path / "unified.json"))


def test_openai_edges_through_router(unified):
    """A request without `model` gets the served model (vLLM does so); a lone surrogate is
    text, not a server error; unknown paths and models answer in OpenAI's error shape."""
    r = httpx.post(f"{unified}/v1/completions", json={"prompt": "no model", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    raw = b'{"model": "tiny", "prompt": "odd \\ud800 text", "max_tokens": 3}'
    r = httpx.post(
        f"{unified}/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    for path in ("/v1/nothing", "/v1/models/gpt-4"):
        r = httpx.get(f"{unified}{path}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == 404 and r.json()["error"]["message"]
    assert httpx.get(f"{unified}/v1/models/tiny").json()["id"] == "tiny"


def test_a_second_up_on_a_busy_port_says_so(unified, tmp_path):
    import subprocess

    from procs import cli

    port = unified.rsplit(":", 1)[1]
    done = subprocess.run(
        cli("up", "-f", "examples/tiny-sim.yaml", "--port", port, "--run-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in done.stdout
    assert "is serving" not in done.stdout
    assert not list(tmp_path.glob("*.log"))  # nothing was started
