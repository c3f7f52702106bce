"""Router and engine behaviour on real processes: client disconnects abort upstream work,
PD prefill failures are retried elsewhere, KV params that are bad or expired fail clearly,
API keys and concurrency limits hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest
import yaml

from helpers import load_example
from procs import cli, free_port, up, wait_healthy


def slow(example: str, tmp_path, **runtime) -> object:
    spec = load_example(example)
    spec["spec"]["runtime"].update(runtime)
    path = tmp_path / f"slow-{example}"
    path.write_text(yaml.safe_dump(spec))
    return path


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing")


def test_client_disconnect_aborts_engine_request(tmp_path):
    path = slow("tiny-sim.yaml", tmp_path, sim={"fixedItlMs": 5})
    with up(path, tmp_path) as (url, _proc, _out):
        engines = [b["url"] for b in httpx.get(f"{url}/instances").json()["unified"]]
        body = {"model": "tiny", "prompt": "go", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert sum(metric(e, "vllm:num_requests_running") for e in engines) == 1
        deadline = time.time() + 10
        while time.time() < deadline:
            if sum(metric(e, "vllm:num_requests_running") for e in engines) == 0:
                break
            time.sleep(0.1)
        assert sum(metric(e, "vllm:num_requests_running") for e in engines) == 0
        assert sum(metric(e, "vllm:kv_cache_usage_perc") for e in engines) == 0
        generated = sum(metric(e, "vllm:generation_tokens_total") for e in engines)
        assert generated < 3000  # the request stopped when the client left
        closed = 'ascend_serve_router_requests_total{code="499",route="/v1/completions"} 1.0'
        assert closed in httpx.get(f"{url}/metrics").text
        log = (tmp_path / "router.log").read_text()
        assert "the client closed the connection during the response" in log
        assert "Traceback" not in log


def test_prefill_failure_is_retried_on_another_instance(tmp_path):
    with up("tiny-sim-pd.yaml", tmp_path) as (url, _proc, _out):
        instances = httpx.get(f"{url}/instances").json()
        victim = instances["prefill"][0]["url"]
        port = victim.rsplit(":", 1)[1]
        pid = next(
            int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, f"--port {port}")
        )
        os.kill(pid, signal.SIGKILL)
        texts = set()
        for _ in range(6):
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": "tiny", "prompt": "retry me", "max_tokens": 4, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            texts.add(r.json()["choices"][0]["text"])
        assert len(texts) == 1
        metrics = httpx.get(f"{url}/metrics").text
        assert 'ascend_serve_router_errors_total{kind="connect",role="prefill"}' in metrics
        state = {b["url"]: b for b in httpx.get(f"{url}/instances").json()["prefill"]}
        assert state[victim]["healthy"] is False


def _cmdline_has(pid: str, fragment: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fragment in fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def test_bad_and_expired_kv_params(tmp_path):
    path = slow("tiny-sim-pd.yaml", tmp_path, sim={"kvTransferTimeoutSeconds": 1})
    with up(path, tmp_path) as (url, _proc, _out):
        instances = httpx.get(f"{url}/instances").json()
        prefill, decode = instances["prefill"][0]["url"], instances["decode"][0]["url"]
        base = {"model": "tiny", "prompt": "pd by hand", "max_tokens": 3, "temperature": 0}
        r = httpx.post(
            f"{decode}/v1/completions",
            json={**base, "kv_transfer_params": {"do_remote_prefill": True}},
        )
        assert r.status_code == 400 and "lacks remote_engine_id" in r.json()["error"]["message"]
        first = httpx.post(
            f"{prefill}/v1/completions",
            json={**base, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
        ).json()
        params = first["kv_transfer_params"]
        assert params["remote_host"] == "127.0.0.1" and params["do_remote_prefill"] is True
        assert params["remote_engine_id"].startswith("tiny-pd-prefill-")
        ok = httpx.post(f"{decode}/v1/completions", json={**base, "kv_transfer_params": params})
        assert ok.status_code == 200
        again = httpx.post(f"{decode}/v1/completions", json={**base, "kv_transfer_params": params})
        assert again.status_code == 400
        assert "expired or unknown" in again.json()["error"]["message"]
        held = httpx.post(
            f"{prefill}/v1/completions",
            json={**base, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
        ).json()
        time.sleep(2.5)  # past the 1 s hold
        late = httpx.post(
            f"{decode}/v1/completions",
            json={**base, "kv_transfer_params": held["kv_transfer_params"]},
        )
        assert late.status_code == 400 and "expired" in late.json()["error"]["message"]
        assert metric(prefill, "vllm:kv_cache_usage_perc") == 0  # nothing leaked
        wrong = dict(params, remote_request_id="nope")
        r = httpx.post(f"{decode}/v1/completions", json={**base, "kv_transfer_params": wrong})
        assert r.status_code == 400


@pytest.fixture
def keyed_router(tmp_path):
    """One sim engine and a router with API keys and a concurrency limit of 2."""
    from ascend_operator.planner import plan_manifest

    spec = load_example("tiny-sim.yaml")
    spec["spec"]["runtime"]["sim"] = {"fixedItlMs": 20}
    plan = plan_manifest(spec)
    config = tmp_path / "unified.json"
    config.write_text(plan.role("unified").runtime_config.model_dump_json())
    engine_port, router_port = free_port(), free_port()
    keys = tmp_path / "keys"
    keys.write_text("alpha\nbeta\n")
    admin = tmp_path / "admin-keys"
    admin.write_text("root-secret\n")
    router_cfg = plan.router.config.model_copy(
        update={
            "backends": plan.router.config.backends.model_copy(
                update={
                    "source": "static",
                    "static": {"unified": [f"http://127.0.0.1:{engine_port}"]},
                }
            ),
            "api_keys_file": str(keys),
            "admin_keys_file": str(admin),
            "max_concurrent_requests": 2,
        }
    )
    (tmp_path / "router.json").write_text(router_cfg.model_dump_json())
    procs = [
        subprocess.Popen(
            cli("sim", "--config", str(config), "--host", "127.0.0.1", "--port", str(engine_port))
        ),
        subprocess.Popen(
            cli(
                "router",
                "--config",
                str(tmp_path / "router.json"),
                "--host",
                "127.0.0.1",
                "--port",
                str(router_port),
            )
        ),
    ]
    try:
        wait_healthy(f"http://127.0.0.1:{engine_port}", proc=procs[0])
        wait_healthy(f"http://127.0.0.1:{router_port}", proc=procs[1])
        yield f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{engine_port}"
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_api_keys_and_concurrency_limit(keyed_router):
    url, _engine = keyed_router
    body = {"model": "tiny", "prompt": "k", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
    bad = httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": "Bearer x"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    good = httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": "Bearer beta"})
    assert good.status_code == 200
    auth = {"authorization": "Bearer alpha"}
    slow_body = {**body, "max_tokens": 100, "stream": True}
    with (
        httpx.stream("POST", f"{url}/v1/completions", json=slow_body, headers=auth) as a,
        httpx.stream("POST", f"{url}/v1/completions", json=slow_body, headers=auth) as b,
    ):
        assert a.status_code == b.status_code == 200
        busy = httpx.post(f"{url}/v1/completions", json=body, headers=auth)
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
    deadline = time.time() + 10
    while time.time() < deadline:
        if httpx.post(f"{url}/v1/completions", json=body, headers=auth).status_code == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("slots were not released after the streams closed")
    text = httpx.get(f"{url}/metrics").text
    assert 'ascend_serve_router_requests_total{code="429",route="/v1/completions"}' in text
    assert json.loads(httpx.get(f"{url}/health").text)["status"] == "ok"


def test_membership_changes_need_the_admin_key(keyed_router, tmp_path):
    url, engine = keyed_router
    api, admin = {"authorization": "Bearer alpha"}, {"authorization": "Bearer root-secret"}
    intruder = {"role": "unified", "url": "http://127.0.0.1:9"}
    for headers in ({}, api, {"authorization": "Bearer root-secre"}):
        r = httpx.post(f"{url}/instances/add", json=intruder, headers=headers)
        assert r.status_code == 401, r.text
        assert "admin key" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/instances").status_code == 401  # the listing needs an API key
    listed = httpx.get(f"{url}/instances", headers=api).json()["unified"]
    assert [b["url"] for b in listed] == [engine]
    bad = httpx.post(f"{url}/instances/add", json={"role": "decode", "url": "x"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"
    assert httpx.post(f"{url}/instances/add", json=intruder, headers=admin).status_code == 200
    assert len(httpx.get(f"{url}/instances", headers=api).json()["unified"]) == 2
    r = httpx.post(f"{url}/instances/remove", json=intruder, headers=admin)
    assert r.status_code == 200
    assert [b["url"] for b in httpx.get(f"{url}/instances", headers=api).json()["unified"]] == [
        engine
    ]


def test_membership_changes_are_off_without_an_admin_credential(tmp_path):
    with up("tiny-sim.yaml", tmp_path) as (url, _proc, _out):
        r = httpx.post(
            f"{url}/instances/add", json={"role": "unified", "url": "http://127.0.0.1:9"}
        )
        assert r.status_code == 403
        assert "adminKeysSecret" in r.json()["error"]["message"]
        assert len(httpx.get(f"{url}/instances").json()["unified"]) == 2


def test_requests_decode_would_refuse_never_reach_prefill(tmp_path):
    """PD: max_tokens < 1 and prompts that do not fit the context with their max_tokens are
    refused by the router; no prefill instance sees them (it would hold their KV)."""
    with up("tiny-sim-pd.yaml", tmp_path) as (url, _proc, _out):

        def prefilled() -> int:
            return sum(b["served"] for b in httpx.get(f"{url}/instances").json()["prefill"])

        long_text = "word " * 3000  # 3,000 sim tokens of the 4,096 context
        cases = [
            ({"prompt": "x", "max_tokens": 0}, "at least 1"),
            ({"prompt": "x", "max_tokens": -5}, "at least 1"),
            ({"prompt": "x", "max_completion_tokens": 4096}, "maximum context length"),
            ({"prompt": long_text, "max_tokens": 1500}, "you requested 4500 tokens"),
            ({"prompt": list(range(4096))}, "even without any output tokens"),
            ({"messages": [{"role": "user", "content": long_text}], "max_tokens": 1200}, "4"),
        ]
        before = prefilled()
        for extra, fragment in cases:
            path = "/v1/chat/completions" if "messages" in extra else "/v1/completions"
            r = httpx.post(f"{url}{path}", json={"model": "tiny", **extra}, timeout=30)
            assert r.status_code == 400, (extra.keys(), r.text)
            assert fragment in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == 400
        assert prefilled() == before
        fits = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": long_text, "max_tokens": 8},
            timeout=30,
        )
        assert fits.status_code == 200, fits.text
        counted = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": long_text})
        assert counted.json()["count"] == 3000
        assert counted.json()["max_model_len"] == 4096
