"""A deployment's life on a real control plane with kube-controller-manager: StatefulSets and
the router Deployment get pods, the test plays the kubelet (pods Running and Ready with an IP),
and the operator's status, rollouts, scaling, repairs, restarts and deletion are checked
against what the real controllers do."""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from apiserver.conftest import Installation, forbidden, helm_install, helm_uninstall, run_tool
from ascend_operator.render.labels import DEPLOYMENT_LABEL, TEMPLATE_HASH
from envtest import ControlPlane, eventually
from helpers import load_example
from kube import Kube
from operator_harness import OperatorProcess
from procs import free_port


@dataclass
class Operator:
    installation: Installation
    process: OperatorProcess
    liveness: int
    metrics: int
    mark: int
    restart_window: tuple[str, str] | None = None
    """When an API server restarted (UTC, audit timestamp format): RBAC answers 403 until its
    caches fill."""


@pytest.fixture(scope="module")
def operator(plane: ControlPlane, gc, kube: Kube, crd, tmp_path_factory) -> Iterator[Operator]:
    installation = helm_install(plane, kube, "life", "life-ops")
    live, prom = free_port(), free_port()
    log: Path = tmp_path_factory.mktemp("life") / "operator.log"
    process = installation.operator(
        log,
        "--liveness",
        f"http://127.0.0.1:{live}/healthz",
        "--metrics-port",
        str(prom),
        "--log-format",
        "json",
    )
    mark = plane.audit_mark()
    process.start()
    try:
        yield Operator(installation, process, live, prom, mark)
    finally:
        process.stop()
        helm_uninstall(plane, "life", "life-ops")
        kube.delete("Namespace", None, "life-ops")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def deploy(kube: Kube, namespace: str, example: str, **spec) -> dict:
    doc = load_example(example)
    doc["metadata"]["namespace"] = namespace
    doc["spec"].update(spec)
    kube.create(doc)
    return doc


def md(kube: Kube, doc: dict) -> dict:
    return kube.get("ModelDeployment", doc["metadata"]["namespace"], doc["metadata"]["name"])


def phase(kube: Kube, doc: dict) -> str | None:
    return (md(kube, doc).get("status") or {}).get("phase")


def condition(obj: dict, type_: str) -> dict:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {}
    )


def roles(kube: Kube, doc: dict) -> dict[str, tuple[int, int]]:
    """Role -> (ready, desired) instances, from status."""
    return {
        r["name"]: (r["readyInstances"], r["desiredInstances"])
        for r in (md(kube, doc).get("status") or {}).get("roles", [])
    }


@dataclass
class Kubelet:
    """Plays the kubelet: a pod becomes Running and Ready `delay` seconds after it is first
    seen (pods listed in `down` stay not ready)."""

    kube: Kube
    namespace: str
    delay: float = 0.0
    down: set[str] = field(default_factory=set)
    seen: dict[str, float] = field(default_factory=dict)

    def step(self) -> None:
        now = time.monotonic()
        for i, pod in enumerate(self.kube.list("Pod", self.namespace)):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            ready = any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (pod.get("status") or {}).get("conditions") or []
            )
            name = meta["name"]
            want = name not in self.down
            first = self.seen.setdefault(meta["uid"], now)
            if ready != want and now - first >= self.delay:
                self.kube.mark_pod(self.namespace, pod, ready=want, ip=f"10.244.1.{i + 10}")

    def until(self, check, timeout: float = 60.0, message: str = ""):
        def stepped():
            self.step()
            return check()

        return eventually(stepped, timeout, message)


def test_pods_ready_then_degraded_then_scaled(operator: Operator, kube: Kube, namespace: str):
    doc = deploy(kube, namespace, "tiny-sim-pd.yaml", workload={"kind": "StatefulSet"})
    kubelet = Kubelet(kube, namespace)
    # 2 prefill + 2 decode instances of one pod each, and the router
    pods = eventually(lambda: len(kube.list("Pod", namespace)) == 5 and 5, 60, "pods created")
    assert pods == 5
    kubelet.until(lambda: phase(kube, doc) == "Ready", 60, "Ready once every pod is")
    status = md(kube, doc)["status"]
    assert roles(kube, doc) == {"prefill": (2, 2), "decode": (2, 2)}
    assert status["ready"] == "4/4" and status["replicas"] == 2
    assert condition(md(kube, doc), "Ready")["status"] == "True"

    kubelet.down.add(f"{doc['metadata']['name']}-decode-1-0")
    kubelet.until(lambda: phase(kube, doc) == "Degraded", 30, "Degraded after a lost pod")
    assert roles(kube, doc)["decode"] == (1, 2)
    assert condition(md(kube, doc), "Degraded")["status"] == "True"
    kubelet.down.clear()
    kubelet.until(lambda: phase(kube, doc) == "Ready", 30, "Ready again")

    run_tool(
        kube.plane,
        "kubectl",
        "scale",
        "md",
        doc["metadata"]["name"],
        "-n",
        namespace,
        "--replicas=3",
    )
    kubelet.until(
        lambda: roles(kube, doc).get("decode") == (3, 3) and phase(kube, doc) == "Ready",
        60,
        "kubectl scale is followed",
    )
    assert md(kube, doc)["status"]["replicas"] == 3


def _template(sts: dict) -> str:
    return sts["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH]


def _ready(sts: dict) -> bool:
    status = sts.get("status") or {}
    return int(status.get("readyReplicas") or 0) >= sts["spec"]["replicas"] and (
        status.get("currentRevision") == status.get("updateRevision")
    )


def test_rollout_moves_one_instance_at_a_time_prefill_first(
    operator: Operator, kube: Kube, namespace: str
):
    doc = deploy(kube, namespace, "tiny-sim-pd.yaml", workload={"kind": "StatefulSet"})
    name = doc["metadata"]["name"]
    kubelet = Kubelet(kube, namespace, delay=1.0)  # engines take a moment to start
    kubelet.until(lambda: phase(kube, doc) == "Ready", 90, "Ready before the rollout")
    before = {s["metadata"]["name"]: _template(s) for s in kube.list("StatefulSet", namespace)}
    generation = md(kube, doc)["metadata"]["generation"]
    kube.merge("ModelDeployment", namespace, name, {"spec": {"runtime": {"maxNumSeqs": 16}}})

    phases, moved_order, worst = set(), [], 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        kubelet.step()
        sets = {s["metadata"]["name"]: s for s in kube.list("StatefulSet", namespace)}
        moved = {n for n, s in sets.items() if _template(s) != before[n]}
        moved_order += sorted(n for n in moved if n not in moved_order)
        # instances on the new template that are not back yet, per role
        for role in ("prefill", "decode"):
            moving = [n for n in moved if f"-{role}-" in n and not _ready(sets[n])]
            worst = max(worst, len(moving))
        if any("-decode-" in n for n in moved):
            prefill = [n for n in sets if "-prefill-" in n]
            assert all(n in moved and _ready(sets[n]) for n in prefill), (
                "decode moved before every prefill instance was updated and ready"
            )
        status = md(kube, doc).get("status") or {}
        if status.get("observedGeneration", 0) > generation:
            phases.add(status.get("phase"))
            if status.get("phase") == "Ready":
                break
        time.sleep(0.2)
    assert len(moved_order) == 4, f"not every instance moved: {moved_order}"
    assert [n.rsplit("-", 1)[0] for n in moved_order] == [f"{name}-prefill"] * 2 + [
        f"{name}-decode"
    ] * 2
    assert worst <= 1, f"{worst} instances of one role were down at once"
    assert "Degraded" not in phases and "Progressing" in phases, phases
    final = md(kube, doc)["status"]
    assert all(r["updatedInstances"] == r["desiredInstances"] for r in final["roles"])


def test_delete_garbage_collects_every_child(operator: Operator, kube: Kube, namespace: str):
    doc = deploy(kube, namespace, "tiny-sim.yaml", workload={"kind": "StatefulSet"})
    eventually(lambda: len(kube.owned(namespace)) >= 10, 60, "children created")
    eventually(lambda: len(kube.list("Pod", namespace)) == 3, 60, "pods created")
    kube.delete("ModelDeployment", namespace, doc["metadata"]["name"])
    eventually(lambda: kube.owned(namespace) == {}, 60, "the garbage collector removed all")
    eventually(lambda: kube.list("Pod", namespace) == [], 60, "and their pods")


def test_stripped_labels_are_restored_and_owned_strays_pruned(
    operator: Operator, kube: Kube, namespace: str
):
    doc = deploy(kube, namespace, "tiny-sim.yaml", workload={"kind": "StatefulSet"})
    name = doc["metadata"]["name"]
    eventually(lambda: kube.get("StatefulSet", namespace, f"{name}-unified-1"), 60)
    service = f"{name}-unified-http"
    kube.merge(
        "Service",
        namespace,
        service,
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": None, DEPLOYMENT_LABEL: None}}},
    )
    eventually(
        lambda: (
            kube.get("Service", namespace, service)["metadata"]["labels"].get(
                "app.kubernetes.io/managed-by"
            )
            == "ascend-serve-operator"
        ),
        30,
        "labels restored",
    )
    # An instance whose labels were stripped is still found (by owner reference) and pruned.
    kube.merge(
        "StatefulSet",
        namespace,
        f"{name}-unified-1",
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": None, DEPLOYMENT_LABEL: None}}},
    )
    kube.merge("ModelDeployment", namespace, name, {"spec": {"replicas": 1}})
    eventually(
        lambda: kube.get("StatefulSet", namespace, f"{name}-unified-1") is None, 30, "pruned"
    )


def _expected_names(kube: Kube, doc: dict) -> set[tuple[str, str]]:
    from ascend_operator.api import ModelDeployment
    from ascend_operator.planner import ClusterInfo
    from ascend_operator.planner.plan import plan
    from ascend_operator.render import render

    doc = copy.deepcopy(doc)
    doc["metadata"]["uid"] = md(kube, doc)["metadata"]["uid"]
    p = plan(ModelDeployment.from_manifest(doc), ClusterInfo(lws_available=False))
    return {(o["kind"], o["metadata"]["name"]) for o in render(p)}


def test_operator_and_api_server_restarts_converge(
    operator: Operator, kube: Kube, namespace: str, plane: ControlPlane
):
    doc = deploy(kube, namespace, "tiny-sim-pd.yaml", workload={"kind": "StatefulSet"})
    eventually(lambda: set(kube.owned(namespace)) == _expected_names(kube, doc), 60)
    operator.process.stop(kill=True)
    kube.merge("ModelDeployment", namespace, doc["metadata"]["name"], {"spec": {"replicas": 3}})
    doc["spec"]["replicas"] = 3
    operator.process.start()
    eventually(lambda: set(kube.owned(namespace)) == _expected_names(kube, doc), 60, "after kill")

    before = utc_now()
    plane.restart_apiserver()
    kube.http.close()
    kube.http = plane.http()
    kube.merge("ModelDeployment", namespace, doc["metadata"]["name"], {"spec": {"replicas": 1}})
    doc["spec"]["replicas"] = 1
    eventually(
        lambda: set(kube.owned(namespace)) == _expected_names(kube, doc),
        90,
        "converged after the API server restarted",
    )
    assert operator.process.proc.poll() is None
    eventually(
        lambda: (
            md(kube, doc)["status"]["observedGeneration"] == md(kube, doc)["metadata"]["generation"]
        ),
        30,
    )
    operator.restart_window = (before, utc_now())


def test_liveness_metrics_json_logs_and_no_refusals(operator: Operator, plane: ControlPlane):
    assert eventually(
        lambda: httpx.get(f"http://127.0.0.1:{operator.liveness}/healthz").status_code == 200,
        20,
    )
    text = httpx.get(f"http://127.0.0.1:{operator.metrics}/metrics").text
    assert 'ascend_serve_operator_reconciles_total{result="ok"}' in text
    assert "ascend_serve_operator_reconcile_duration_seconds_count" in text
    assert 'ascend_serve_operator_writes_total{verb="apply"}' in text
    records = [
        json.loads(line)
        for line in operator.process.log_text().splitlines()
        if line.startswith("{")
    ]
    assert any(r["message"].startswith("reconciled ") for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert (
        forbidden(plane, operator.installation.user, operator.mark, operator.restart_window) == []
    )
