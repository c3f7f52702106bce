"""`ascend-serve up`'s process plan for real vLLM: the local model directory, loopback binds,
a KV port block per instance, the transport, and the errors that say what to change."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pytest

from ascend_operator.local_run import LocalDeployment, LocalProcess, local_processes
from ascend_operator.local_setup import UpError, engine_has_mooncake, free_port, free_port_block
from ascend_operator.planner import ClusterInfo, plan_manifest
from helpers import load_example


def pd_manifest(model_dir: Path, tensor: int = 1, **source) -> dict:
    return {
        "apiVersion": "ascendserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "tq", "namespace": "default"},
        "spec": {
            "model": {
                "name": "tiny",
                "source": source or {"hostPath": {"path": str(model_dir)}},
                "maxModelLen": 2048,
                "architecture": {"preset": "tiny"},
            },
            "hardware": {"profile": "A2"},
            "runtime": {"engine": "vllm", "kvConnector": "ascend-serve"},
            "roles": [
                {"name": "prefill", "replicas": 2, "parallelism": {"tensor": tensor}},
                {"name": "decode", "parallelism": {"tensor": tensor}},
            ],
        },
    }


def plan_of(doc: dict):
    return plan_manifest(doc, ClusterInfo())


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_vllm_processes_use_the_local_model_loopback_and_their_own_kv_ports(tmp_path):
    plan = plan_of(pd_manifest(tmp_path, tensor=2))
    engines, _ = local_processes(plan, tmp_path / "run", "vllm", 8000, "tcp")
    assert [e.name for e in engines] == ["prefill-0-0", "prefill-1-0", "decode-0-0"]
    ports = []
    for proc in engines:
        assert proc.argv[:3] == ["vllm", "serve", str(tmp_path)]
        assert option(proc.argv, "--host") == "127.0.0.1"
        assert proc.argv.count("--host") == proc.argv.count("--port") == 1  # replaced, not added
        kv = json.loads(option(proc.argv, "--kv-transfer-config"))
        assert kv["kv_connector_extra_config"]["transport"] == "tcp"
        ports.append(kv["kv_port"])
    # two ranks each (TP 2): no instance's block of ports overlaps another's
    spans = [set(range(p, p + 2)) for p in ports]
    assert all(not (a & b) for i, a in enumerate(spans) for b in spans[i + 1 :])
    assert len({option(p.argv, "--port") for p in engines}) == 3
    members = json.loads((tmp_path / "run" / "router.json").read_text())["backends"]["static"]
    assert len(members["prefill"]) == 2 and len(members["decode"]) == 1


def test_the_sim_keeps_its_own_command(tmp_path):
    plan = plan_of(pd_manifest(tmp_path))
    engines, _ = local_processes(plan, tmp_path / "run", "sim", 8000)
    assert all("sim" in e.argv for e in engines)


def test_sources_without_a_local_directory_are_refused(tmp_path):
    missing = plan_of(pd_manifest(tmp_path / "nope"))
    with pytest.raises(UpError, match=r"hostPath.path .*nope is not a directory"):
        local_processes(missing, tmp_path / "run", "vllm", 8000)
    pvc = plan_of(pd_manifest(tmp_path, pvc={"claimName": "models"}))
    with pytest.raises(UpError, match=r"use spec\.model\.source\.hostPath"):
        local_processes(pvc, tmp_path / "run", "vllm", 8000)


def test_port_blocks_do_not_overlap():
    taken: set[int] = set()
    first, second = free_port_block(4, taken), free_port_block(4, taken)
    assert not set(range(first, first + 4)) & set(range(second, second + 4))
    assert len(taken) == 8


def test_every_port_up_picks_is_its_own(tmp_path, monkeypatch):
    """None of the ports is bound before its process starts, so the OS may offer one free
    port again and again: engine HTTP, sim KV-transfer and KV-event ports stay distinct from
    each other and from the router's (a CI run once lost a prefill to a reused port)."""
    from ascend_operator import local_setup

    base = free_port_block(32, set())
    offers = iter([p for p in range(base, base + 32) for _ in range(3)] * 100)
    monkeypatch.setattr(local_setup, "free_port", lambda: next(offers))
    doc = load_example("tiny-sim-pd.yaml")
    doc["spec"]["router"] = {"policy": "kv-aware"}  # every instance publishes KV events
    router_port = base + 3
    engines, _ = local_processes(plan_manifest(doc), tmp_path, "sim", router_port)
    ports = [router_port]
    for engine in engines:
        ports.append(int(option(engine.argv, "--port")))
        if "--kv-port" in engine.argv:
            ports.append(int(option(engine.argv, "--kv-port")))
    routing = json.loads((tmp_path / "router.json").read_text())
    for where in routing["backends"]["kv_events"].values():
        ports += [int(e.rsplit(":", 1)[1]) for e in where.values() if e]
    assert len(ports) == 1 + 4 + 2 + 4 * 2, ports  # router, 4 engines, 2 prefill KV, events
    assert len(set(ports)) == len(ports), sorted(ports)


def test_a_signal_during_a_slow_start_stops_waiting(tmp_path):
    """Real engines take minutes to start; Ctrl-C must not wait for them."""
    slow = LocalProcess(
        "engine", [sys.executable, "-c", "import time; time.sleep(60)"], {},
        tmp_path / "engine.log", f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    router = LocalProcess("router", [sys.executable, "-c", "pass"], {}, tmp_path / "r.log")
    deployment = LocalDeployment([slow], router, io.StringIO())
    asked = time.monotonic() + 0.5
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stopped before every process was ready"):
        deployment.start(ready_timeout=60, stop=lambda: time.monotonic() > asked)
    assert time.monotonic() - started < 10
    deployment.stop(grace=5)
    assert slow.popen is not None and slow.popen.poll() is not None


def test_the_transport_is_what_the_engines_python_can_import(tmp_path):
    """Mooncake where the Python that runs `vllm` imports it, else TCP."""
    fake_vllm = tmp_path / "vllm"
    fake_vllm.write_text(f"#!{sys.executable}\n")
    assert engine_has_mooncake(str(fake_vllm)) is False  # this venv has no mooncake
    package = tmp_path / "site" / "mooncake"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    wrapper = tmp_path / "python-with-mooncake"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    fake_vllm.write_text(f"#!{wrapper}\n")
    assert engine_has_mooncake(str(fake_vllm)) is True
