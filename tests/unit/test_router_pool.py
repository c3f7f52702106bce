"""Router balancing and membership sources (static, file, Kubernetes EndpointSlices on KMock)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from ascend_runtime.config import RouterBackends
from ascend_runtime.router.health import kv_blocks, parse_metric
from ascend_runtime.router.membership import Membership, ready_urls
from ascend_runtime.router.pool import Pool
from kmock_server import RESOURCES, kmock_api


def test_least_outstanding_then_kv_usage_then_rotation():
    pool = Pool()
    pool.set_members("decode", ["http://a", "http://b", "http://c"])
    a, b, c = pool.members("decode")
    a.outstanding, b.outstanding, c.outstanding = 2, 1, 1
    b.kv_usage, c.kv_usage = 0.5, 0.1
    assert pool.pick("decode") is c
    c.kv_usage = 0.5
    picks = {pool.pick("decode").url for _ in range(4)}
    assert picks == {"http://b", "http://c"}  # ties rotate
    pool.eject(c, "boom")
    assert pool.pick("decode") is b
    assert pool.pick("decode", exclude={"http://b"}) is a
    assert pool.pick("prefill") is None


def test_round_robin_and_membership_changes_keep_state():
    pool = Pool(policy="round-robin")
    pool.set_members("unified", ["http://a", "http://b"])
    pool.members("unified")[0].served = 7
    assert [pool.pick("unified").url for _ in range(4)] == ["http://a", "http://b"] * 2
    pool.set_members("unified", ["http://a/", "http://c"])
    assert {b.url: b.served for b in pool.members("unified")} == {"http://a": 7, "http://c": 0}


def test_parse_metric_sums_series():
    text = (
        '# HELP x\nvllm:kv_cache_usage_perc{engine="a"} 0.25\n'
        'vllm:kv_cache_usage_perc{engine="b"} 0.5\nvllm:kv_cache_usage_perc_x 9\n'
    )
    assert parse_metric(text, "vllm:kv_cache_usage_perc") == 0.75
    assert parse_metric(text, "missing") is None


def test_kv_blocks_come_from_vllms_cache_config_info():
    # the label set vLLM 0.32 exports (abridged), one sample per data-parallel engine
    text = (
        'vllm:cache_config_info{block_size="128",cache_dtype="auto",engine="0",'
        'num_gpu_blocks="1875",num_cpu_blocks="None"} 1.0\n'
        'vllm:cache_config_info{block_size="128",engine="1",num_gpu_blocks="1875"} 1.0\n'
    )
    assert kv_blocks(text) == 1875
    assert kv_blocks('vllm:cache_config_info{num_gpu_blocks="None"} 1.0\n') is None
    assert kv_blocks("vllm:kv_cache_usage_perc 0.5\n") is None


def test_ready_urls():
    slice_ = {
        "ports": [{"name": "http", "port": 8000}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
            {"addresses": ["fd00::3"]},
        ],
    }
    assert ready_urls(slice_, 9000) == ["http://10.0.0.1:8000", "http://[fd00::3]:8000"]


def test_file_membership(tmp_path):
    members = tmp_path / "members.json"
    members.write_text(json.dumps({"unified": ["http://x:1"]}))

    async def scenario() -> tuple[list[str], list[str]]:
        pool = Pool()
        m = Membership(RouterBackends(source="file", file=str(members)), pool)
        await m.start()
        first = [b.url for b in pool.members("unified")]
        time.sleep(0.01)
        members.write_text(json.dumps({"unified": ["http://x:1", "http://y:2"]}))
        for _ in range(40):
            await asyncio.sleep(0.1)
            if len(pool.members("unified")) == 2:
                break
        await m.stop()
        return first, sorted(b.url for b in pool.members("unified"))

    assert scenario_result(scenario) == (["http://x:1"], ["http://x:1", "http://y:2"])


def scenario_result(fn):
    return asyncio.run(fn())


def _slice(name: str, service: str, ips: list[str], ready: bool = True) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {
            "name": name,
            "namespace": "llm",
            "labels": {"kubernetes.io/service-name": service},
        },
        "ports": [{"name": "http", "port": 8000}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
    }


def test_endpointslice_membership_on_kmock(monkeypatch):
    resources = {**RESOURCES, "discovery.k8s.io/v1/endpointslices": ("EndpointSlice", True, set())}
    with kmock_api(resources) as (url, _):
        monkeypatch.setenv("ASCEND_SERVE_KUBE_API", url)
        api = f"{url}/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices"
        httpx.post(api, json=_slice("d-1", "m-decode-http", ["10.0.0.1", "10.0.0.2"]))
        httpx.post(api, json=_slice("p-1", "m-prefill-http", ["10.0.1.1"]))
        httpx.post(api, json=_slice("other", "unrelated", ["10.9.9.9"]))

        async def scenario() -> list[list[str]]:
            pool = Pool()
            backends = RouterBackends(
                source="kubernetes",
                namespace="llm",
                services={"prefill": "m-prefill-http", "decode": "m-decode-http"},
            )
            m = Membership(backends, pool)
            await m.start()
            seen = []

            async def wait_for(expected: list[str]) -> None:
                for _ in range(100):
                    now = sorted(b.url for b in pool.members("decode"))
                    if now == expected:
                        seen.append(now)
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError(f"decode members {now}, expected {expected}")

            await wait_for(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
            assert [b.url for b in pool.members("prefill")] == ["http://10.0.1.1:8000"]
            await asyncio.to_thread(
                httpx.patch,
                f"{api}/d-1",
                json={
                    "endpoints": [
                        {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                        {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                    ]
                },
                headers={"content-type": "application/merge-patch+json"},
            )
            await wait_for(["http://10.0.0.1:8000"])
            await asyncio.to_thread(httpx.delete, f"{api}/d-1")
            await wait_for([])
            await m.stop()
            return seen

        assert len(asyncio.run(scenario())) == 3


def test_kubernetes_source_outside_cluster_is_a_clear_error(monkeypatch):
    from ascend_runtime.router.membership import KubernetesApi

    monkeypatch.delenv("ASCEND_SERVE_KUBE_API", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RuntimeError, match="not in a cluster"):
        KubernetesApi.from_environment()


def test_health_checker_ejects_and_readmits():
    """A failing /health ejects at once; an instance ejected after failed requests comes back
    only once its ejection period is over and /health passes."""
    import aiohttp
    from aiohttp import web

    from ascend_runtime.router.health import HealthChecker

    state = {"status": 200}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=state["status"])

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            text='vllm:kv_cache_usage_perc{engine="e"} 0.42\n'
            'vllm:cache_config_info{engine="0",num_gpu_blocks="640"} 1.0\n'
        )

    async def scenario() -> list[bool]:
        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        pool = Pool()
        backend = pool.add("unified", f"http://127.0.0.1:{port}")
        seen = []
        async with aiohttp.ClientSession() as session:
            checker = HealthChecker(pool, session)
            await checker.check(backend)
            seen.append(backend.available)
            assert backend.kv_usage == 0.42 and backend.kv_blocks == 640
            state["status"] = 503
            await checker.check(backend)
            seen.append(backend.available)
            assert backend.last_error == "/health answered 503"
            state["status"] = 200
            await checker.check(backend)  # passes, but the ejection period is not over
            seen.append(backend.available)
            backend.ejected_until = 0
            await checker.check(backend)
            seen.append(backend.available)
        await runner.cleanup()
        return seen

    assert asyncio.run(scenario()) == [True, False, False, True]
