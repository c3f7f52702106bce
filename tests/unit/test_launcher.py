"""The launcher: every pod's identity, flags and environment equal the planner's, the leader
wait is bounded, and misconfigured pods fail with a clear message."""

from __future__ import annotations

import io
import json

import pytest

from ascend_operator.api import ModelDeployment
from ascend_operator.planner import ClusterInfo
from ascend_operator.planner.plan import plan
from ascend_runtime.config import PodIdentity
from ascend_runtime.engine_command import engine_command
from ascend_runtime.launcher import LaunchError, launch, probe, resolve_identity, wait_for_leader
from helpers import example_paths, load_example


def plans(lws: bool):
    import yaml

    for path in example_paths():
        md = ModelDeployment.from_manifest(yaml.safe_load(path.read_text()))
        yield path.name, plan(md, ClusterInfo(lws_available=lws))


def pod_env(role, instance: int, worker: int, lws: bool, ip: str) -> dict[str, str]:
    env = {"POD_IP": ip, "ASCEND_SERVE_INSTANCE": str(instance), "POD_NAMESPACE": "ns"}
    if lws:
        env |= {
            "LWS_WORKER_INDEX": str(worker),
            "LWS_GROUP_SIZE": str(role.pods_per_instance),
            "LWS_LEADER_ADDRESS": f"{role.workload_name}-{instance}.{role.workload_name}.ns",
        }
    else:
        env |= {"POD_NAME": f"{role.workload_name}-{instance}-{worker}"}
    return env


@pytest.mark.parametrize("lws", [True, False], ids=["lws", "statefulset"])
def test_every_pod_of_every_example_matches_the_plan(lws):
    checked = 0
    for _, p in plans(lws):
        for role in p.roles:
            config = role.runtime_config
            for instance in range(max(role.instances, 1)):
                leader_ip = f"10.1.{instance}.0"
                lookups: list[str] = []

                def resolver(name: str, _ip=leader_ip, _seen=lookups) -> str:
                    _seen.append(name)
                    return _ip

                for pod in role.pods:
                    ip = f"10.1.{instance}.{pod.worker_index}"
                    env = pod_env(role, instance, pod.worker_index, lws, ip)
                    ident = resolve_identity(config, env, resolver, sleep=lambda s: None)
                    assert ident == PodIdentity(
                        instance=instance,
                        worker_index=pod.worker_index,
                        pod_ip=ip,
                        leader_address=leader_ip,
                    )
                    cmd = engine_command(config, ident)
                    if config.engine == "vllm":
                        argv = cmd.argv
                        assert argv[:3] == ["vllm", "serve", config.model_path]
                        assert argv[3 : 3 + len(config.engine_args)] == config.engine_args
                        assert ("--headless" in argv) == (not pod.leader)
                        if not pod.leader:
                            start = argv[argv.index("--data-parallel-start-rank") + 1]
                            assert int(start) == pod.dp_ranks[0]
                        if config.kv_transfer:
                            kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
                            assert kv["engine_id"] == f"{p.name}-{role.name}-{instance}"
                        assert cmd.env["HCCL_IF_IP"] == ip
                        assert {
                            k: v
                            for k, v in cmd.env.items()
                            if k not in ("HCCL_IF_IP", "VLLM_HOST_IP")
                        } == config.env
                    else:
                        assert cmd.argv[:2] == ["ascend-serve", "sim"]
                    checked += 1
                if not lws and role.pods_per_instance > 1:
                    assert lookups[0] == (
                        f"{role.workload_name}-{instance}-0.{role.workload_name}.{p.namespace}.svc"
                    )
    assert checked > 10


def test_leader_that_never_resolves_fails_after_budget():
    clock = [0.0]
    sleeps: list[float] = []

    def resolver(name: str) -> str:
        raise OSError("Name or service not known")

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    with pytest.raises(LaunchError) as exc:
        wait_for_leader("leader.svc", 30, resolver, sleep, clock=lambda: clock[0])
    message = str(exc.value)
    assert "did not resolve within 30 s" in message and "Name or service not known" in message
    assert "leaderWaitSeconds" in message
    assert sum(sleeps) == pytest.approx(30) and max(sleeps) <= 5.0


def test_leader_resolving_late_is_awaited():
    attempts = []

    def resolver(name: str) -> str:
        attempts.append(name)
        if len(attempts) < 3:
            raise OSError("not yet")
        return "10.0.0.9"

    assert wait_for_leader("l", 60, resolver, lambda s: None) == "10.0.0.9"
    assert len(attempts) == 3


def _config(name: str, lws: bool = True):
    p = plan(ModelDeployment.from_manifest(load_example(name)), ClusterInfo(lws_available=lws))
    return p, p.role("decode" if p.pd else "unified")


def test_misconfigured_pods():
    _, role = _config("qwen3-235b-multi-node.yaml")
    cfg = role.runtime_config
    with pytest.raises(LaunchError, match="LWS_WORKER_INDEX is not set"):
        resolve_identity(cfg, {"POD_IP": "1.2.3.4"})
    with pytest.raises(LaunchError, match="LWS_GROUP_SIZE=3"):
        resolve_identity(cfg, {"POD_IP": "1", "LWS_WORKER_INDEX": "0", "LWS_GROUP_SIZE": "3"})
    with pytest.raises(LaunchError, match="outside the instance"):
        resolve_identity(cfg, {"POD_IP": "1", "LWS_WORKER_INDEX": "5", "LWS_LEADER_ADDRESS": "x"})
    _, sts_role = _config("qwen3-235b-multi-node.yaml", lws=False)
    with pytest.raises(LaunchError, match="no StatefulSet ordinal"):
        resolve_identity(sts_role.runtime_config, {"POD_IP": "1", "POD_NAME": "weird"})


def test_launch_dry_run_prints_command(tmp_path):
    _, role = _config("qwen3-235b-pd.yaml")
    path = tmp_path / "runtime.json"
    path.write_text(role.runtime_config.model_dump_json())
    out = io.StringIO()
    env = {
        "POD_IP": "10.0.0.5",
        "LWS_WORKER_INDEX": "0",
        "LWS_GROUP_SIZE": "2",
        "ASCEND_SERVE_INSTANCE": "0",
    }
    assert launch(str(path), dry_run=True, env=env, out=out) == 0
    text = out.getvalue()
    assert "HCCL_IF_IP=10.0.0.5" in text and "vllm serve /models/Qwen3-235B-A22B" in text
    assert "--data-parallel-address 10.0.0.5" in text


def test_launch_rejects_bad_config(tmp_path):
    bad = tmp_path / "runtime.json"
    bad.write_text('{"role": "x"}')
    with pytest.raises(LaunchError, match="is invalid"):
        launch(str(bad), dry_run=True, env={})
    with pytest.raises(LaunchError, match="cannot read"):
        launch(str(tmp_path / "missing.json"), dry_run=True, env={})


def test_probe_worker_and_unreachable_leader(tmp_path):
    _, role = _config("qwen3-235b-multi-node.yaml")
    path = tmp_path / "runtime.json"
    cfg = role.runtime_config.model_copy(update={"http_port": 1})  # nothing listens on port 1
    path.write_text(cfg.model_dump_json())
    assert probe(str(path), {"LWS_WORKER_INDEX": "1", "LWS_LEADER_ADDRESS": "l"}) == 0
    assert probe(str(path), {"LWS_WORKER_INDEX": "0"}, timeout=0.5) == 1
