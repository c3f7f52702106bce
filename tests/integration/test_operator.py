"""The real operator (subprocess) against KMock's stateful API server.

KMock emulates simply: no server-side-apply field ownership (patches merge), no garbage
collection, no admission. So these tests assert what the operator sent (objects, owner
references, statuses, events), not the API server's own semantics."""

from __future__ import annotations

import copy
import json
import time

import pytest

from ascend_operator.api import ModelDeployment
from ascend_operator.controller.reconcile import contains
from ascend_operator.planner import ClusterInfo
from ascend_operator.planner.plan import plan
from ascend_operator.render import render
from helpers import load_example
from operator_harness import eventually, running_operator

NS = "llm"


def example(name: str, **spec_patch) -> dict:
    doc = load_example(name)
    doc["metadata"]["namespace"] = NS
    doc["spec"].update(spec_patch)
    return doc


def expected_children(doc: dict, uid: str, lws: bool) -> dict[tuple[str, str], dict]:
    doc = copy.deepcopy(doc)
    doc["metadata"]["uid"] = uid
    p = plan(ModelDeployment.from_manifest(doc), ClusterInfo(lws_available=lws))
    return {(o["kind"], o["metadata"]["name"]): o for o in render(p)}


def phase(cluster, name: str) -> str | None:
    return (cluster.md(NS, name) or {}).get("status", {}).get("phase")


def condition(cluster, name: str, type_: str) -> dict:
    status = (cluster.md(NS, name) or {}).get("status", {})
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def converged(cluster, doc: dict, lws: bool):
    name = doc["metadata"]["name"]
    want = expected_children(doc, f"uid-{name}", lws)

    def check():
        live = cluster.children(NS, name)
        if set(live) != set(want):
            return False
        return all(contains(_strip(w), live[k]) for k, w in want.items())

    return check


def _strip(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "status"}


@pytest.mark.parametrize("lws", [True, False], ids=["lws", "statefulset"])
def test_apply_creates_children_with_owner_references(tmp_path, lws):
    doc = example("tiny-sim-pd.yaml")
    with running_operator(tmp_path, lws=lws) as (cluster, _):
        cluster.create_md(doc)
        eventually(converged(cluster, doc, lws), 30, "children equal the renderer's")
        for obj in cluster.children(NS, "tiny-pd").values():
            (ref,) = obj["metadata"]["ownerReferences"]
            assert ref["uid"] == "uid-tiny-pd" and ref["controller"] is True
            assert obj["metadata"]["annotations"]["ascendserve.dev/desired-hash"]
        status = eventually(lambda: (cluster.md(NS, "tiny-pd") or {}).get("status"), 20)
        assert status["phase"] in ("Pending", "Progressing")
        assert status["routerEndpoint"] == "http://tiny-pd.llm.svc:8000"
        assert condition(cluster, "tiny-pd", "Validated")["status"] == "True"
        assert condition(cluster, "tiny-pd", "Reconciled")["status"] == "True"
        fallback = condition(cluster, "tiny-pd", "WorkloadFallback")
        assert fallback["status"] == ("False" if lws else "True")


def test_status_follows_child_readiness(tmp_path):
    doc = example("tiny-sim.yaml")
    with running_operator(tmp_path, lws=True) as (cluster, _):
        cluster.create_md(doc)
        eventually(converged(cluster, doc, True), 30)
        cluster.set_status(
            "LeaderWorkerSet",
            NS,
            "tiny-unified",
            {"readyReplicas": 2, "updatedReplicas": 2, "replicas": 2},
        )
        cluster.set_status("Deployment", NS, "tiny-router", {"readyReplicas": 1})
        eventually(lambda: phase(cluster, "tiny") == "Ready", 20, "Ready after children ready")
        status = cluster.md(NS, "tiny")["status"]
        assert status["ready"] == "2/2" and status["replicas"] == 2
        assert status["roleSummary"] == "unified 2/2"
        cluster.set_status("LeaderWorkerSet", NS, "tiny-unified", {"readyReplicas": 1})
        eventually(lambda: phase(cluster, "tiny") == "Degraded", 20, "Degraded after a loss")
        assert condition(cluster, "tiny", "Degraded")["status"] == "True"


def test_edit_patches_children_and_removes_stale_ones(tmp_path):
    doc = example("tiny-sim.yaml")
    with running_operator(tmp_path, lws=False) as (cluster, _):
        cluster.create_md(doc)
        eventually(converged(cluster, doc, False), 30)
        before = cluster.children(NS, "tiny")
        assert ("StatefulSet", "tiny-unified-1") in before
        assert ("PodDisruptionBudget", "tiny-unified") in before
        cluster.patch_md(NS, "tiny", {"spec": {"replicas": 1, "runtime": {"maxNumSeqs": 32}}})
        edited = copy.deepcopy(doc)
        edited["spec"]["replicas"] = 1
        edited["spec"]["runtime"]["maxNumSeqs"] = 32
        eventually(converged(cluster, edited, False), 30, "children follow the edit")
        after = cluster.children(NS, "tiny")
        assert ("StatefulSet", "tiny-unified-1") not in after  # stale instance removed
        assert ("PodDisruptionBudget", "tiny-unified") not in after  # one instance: no PDB
        config = json.loads(after[("ConfigMap", "tiny-unified-runtime")]["data"]["runtime.json"])
        assert config["sim"]["max_num_seqs"] == 32
        old_hash = before[("StatefulSet", "tiny-unified-0")]["spec"]["template"]["metadata"][
            "annotations"
        ]["ascendserve.dev/template-hash"]
        new_hash = after[("StatefulSet", "tiny-unified-0")]["spec"]["template"]["metadata"][
            "annotations"
        ]["ascendserve.dev/template-hash"]
        assert old_hash != new_hash  # the pods roll


def test_deleted_or_edited_child_is_restored(tmp_path):
    doc = example("tiny-sim.yaml")
    with running_operator(tmp_path, lws=True) as (cluster, _):
        cluster.create_md(doc)
        eventually(converged(cluster, doc, True), 30)
        cluster.delete("Service", NS, "tiny-unified-http")
        cluster.patch("ConfigMap", NS, "tiny-router", {"data": {"router.json": "{}"}})
        eventually(converged(cluster, doc, True), 30, "deleted and edited children restored")


def test_invalid_spec_sets_condition_and_event_and_touches_nothing(tmp_path):
    doc = example("tiny-sim.yaml")
    doc["spec"]["roles"] = [{"name": "prefill"}]
    doc["spec"]["runtime"]["graphMode"] = "torchair"
    with running_operator(tmp_path, lws=True) as (cluster, _):
        cluster.create_md(doc)
        eventually(lambda: phase(cluster, "tiny") == "Failed", 30)
        validated = condition(cluster, "tiny", "Validated")
        assert validated["status"] == "False" and validated["reason"] == "InvalidSpec"
        assert (
            "spec.roles" in validated["message"]
            and "spec.runtime.graphMode" in validated["message"]
        )
        events = eventually(
            lambda: [e for e in cluster.objects("Event", NS) if e.get("reason") == "InvalidSpec"],
            20,
        )
        assert events[0]["involvedObject"]["name"] == "tiny"
        assert "TorchAir" in events[0]["message"]
        time.sleep(1.5)
        assert cluster.children(NS, "tiny") == {}


def test_invalid_edit_keeps_running_children(tmp_path):
    doc = example("tiny-sim.yaml")
    with running_operator(tmp_path, lws=True) as (cluster, _):
        cluster.create_md(doc)
        eventually(converged(cluster, doc, True), 30)
        before = cluster.children(NS, "tiny")
        cluster.patch_md(NS, "tiny", {"spec": {"runtime": {"version": "v9.9.9"}}})
        eventually(lambda: phase(cluster, "tiny") == "Failed", 30)
        assert "spec.runtime.version" in condition(cluster, "tiny", "Validated")["message"]
        assert set(cluster.children(NS, "tiny")) == set(before)


def test_deletion_leaves_gc_to_owner_references(tmp_path):
    doc = example("tiny-sim-pd.yaml")
    with running_operator(tmp_path, lws=True) as (cluster, operator):
        cluster.create_md(doc)
        eventually(converged(cluster, doc, True), 30)
        assert "finalizers" not in cluster.md(NS, "tiny-pd")["metadata"]
        cluster.delete_md(NS, "tiny-pd")
        time.sleep(2)
        # KMock has no garbage collector: every child must point at the deleted owner, so a
        # real API server removes them all.
        for obj in cluster.children(NS, "tiny-pd").values():
            assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-tiny-pd"
        assert operator.proc.poll() is None


def test_restart_half_way_converges_without_duplicates(tmp_path):
    doc = example("tiny-sim-pd.yaml")
    with running_operator(tmp_path, lws=False) as (cluster, operator):
        cluster.create_md(doc)
        eventually(lambda: len(cluster.children(NS, "tiny-pd")) >= 3, 30)
        operator.stop(kill=True)
        cluster.patch_md(NS, "tiny-pd", {"spec": {"replicas": 3}})
        operator.start()
        edited = copy.deepcopy(doc)
        edited["spec"]["replicas"] = 3
        eventually(converged(cluster, edited, False), 40, "converged after a restart")
        names = [
            (k, o["metadata"]["name"])
            for k in ("StatefulSet", "Service", "ConfigMap")
            for o in cluster.objects(k, NS, "tiny-pd")
        ]
        assert len(names) == len(set(names))


def _fail(n: int, predicate):
    left = [n]

    def check(request) -> bool:
        if left[0] > 0 and predicate(request):
            left[0] -= 1
            return True
        return False

    check.left = left  # type: ignore[attr-defined]
    return check


def test_api_faults_are_survived(tmp_path):
    doc = example("tiny-sim-pd.yaml")
    with running_operator(tmp_path, lws=True) as (cluster, operator):
        em = cluster.emulator
        method = lambda r: str(r.method).lower().rsplit(".", 1)[-1]  # noqa: E731
        path = lambda r: str(r.url.path)  # noqa: E731
        # a create whose response is lost (500 after the object was stored), then 409s
        faults = [
            # a create whose response is lost (500 after the object was stored), then 409s
            (_fail(1, lambda r: method(r) == "post" and path(r).endswith("/services")), 500),
            (_fail(2, lambda r: method(r) == "post" and path(r).endswith("/configmaps")), 429),
            # a conflict on create (someone else created it): apply onto the existing object
            (_fail(1, lambda r: method(r) == "post" and path(r).endswith("/deployments")), 409),
            (_fail(2, lambda r: method(r) == "patch" and path(r).endswith("/status")), 500),
            # a dropped watch: the first ModelDeployment watch ends at once
            (
                _fail(
                    1, lambda r: r.params.get("watch") == "true" and "modeldeployments" in path(r)
                ),
                b"",
            ),
        ]
        for check, payload in faults:
            em[check] << payload
        cluster.create_md(doc)
        eventually(converged(cluster, doc, True), 60, "converged despite faults")
        eventually(lambda: condition(cluster, "tiny-pd", "Reconciled")["status"] == "True", 30)
        assert operator.proc.poll() is None
        assert [check.left[0] for check, _ in faults] == [0] * len(faults), "a fault never fired"


def _user_agent(request) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")


def _rbac_key(request) -> tuple[str, str, str] | None:
    """(apiGroup, resource[/subresource], verb) of one API request."""
    parts = [p for p in str(request.url.path).split("/") if p]
    if not parts or parts[0] not in ("api", "apis") or len(parts) < (3 if parts[0] == "api" else 4):
        return None  # discovery
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    group = "" if parts[0] == "api" else parts[1]
    if len(rest) < 1:
        return None  # discovery
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    method = str(request.method).lower().rsplit(".", 1)[-1]
    verb = {"post": "create", "patch": "patch", "put": "update", "delete": "delete"}.get(method)
    if method == "get":
        verb = "watch" if request.params.get("watch") == "true" else ("get" if name else "list")
    return group, resource, verb


def test_chart_rbac_covers_exactly_the_operators_calls(tmp_path):
    """Every call the operator makes is allowed by the chart's ClusterRoles, and every rule
    the chart grants is one the operator (or the RBAC escalation check) needs."""
    import shutil
    import subprocess

    import yaml

    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm not on PATH: run `make test` (scripts/install-tools.sh installs it)")
    from helpers import ROOT

    rendered = subprocess.run(
        [helm, "template", "rel", str(ROOT / "charts" / "ascend-serve")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    granted = {
        (g, r, v)
        for doc in yaml.safe_load_all(rendered)
        if doc and doc["kind"] == "ClusterRole"
        for rule in doc["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    doc = example("tiny-sim-pd.yaml")
    with running_operator(tmp_path, lws=False) as (cluster, _):
        cluster.create_md(doc)
        eventually(converged(cluster, doc, False), 30)
        cluster.patch_md(NS, "tiny-pd", {"spec": {"replicas": 1}})
        edited = copy.deepcopy(doc)
        edited["spec"]["replicas"] = 1
        eventually(converged(cluster, edited, False), 30)
        cluster.delete("Service", NS, "tiny-pd")  # restored through the debounced path
        eventually(converged(cluster, edited, False), 30)
        bad = copy.deepcopy(doc)
        bad["metadata"]["name"] = "bad"
        bad["spec"]["roles"] = [{"name": "decode"}]
        cluster.create_md(bad)
        eventually(lambda: phase(cluster, "bad") == "Failed", 30)
        calls = {
            key
            for request in cluster.emulator
            if _user_agent(request).startswith(("kopf", "ascend-serve"))
            and (key := _rbac_key(request)) is not None
        }
    missing = sorted(c for c in calls if c not in granted)
    assert not missing, f"the operator calls what the chart does not grant: {missing}"
    # Granted but never called here: exactly what this scenario cannot exercise.
    kinds = {
        ("", "configmaps"),
        ("", "services"),
        ("", "serviceaccounts"),
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("policy", "poddisruptionbudgets"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
    }
    expected_unused = (
        {
            (g, "endpointslices", v)
            for g in ("discovery.k8s.io",)
            for v in ("get", "list", "watch")
        }  # held for the RBAC escalation check only
        | {
            ("kopf.dev", r, v)
            for r in ("kopfpeerings", "clusterkopfpeerings")
            for v in ("get", "list", "watch", "patch")
        }  # the test runs --standalone
        | {
            ("leaderworkerset.x-k8s.io", "leaderworkersets", v)
            for v in ("create", "patch", "delete")
        }  # the test runs the StatefulSet fallback
        | {("ascendserve.dev", "modeldeployments", "get")}  # re-read after a failed pass only
        | {(g, r, v) for g, r in kinds for v in ("delete", "patch")}  # some kinds only
        # change (patch) or go away (delete) in this scenario
    )
    assert {c for c in granted if c not in calls} <= expected_unused
    assert calls - {c for c in granted} == set()


def test_liveness_metrics_and_json_logs(tmp_path):
    import httpx

    from kmock_server import kmock_api, write_kubeconfig
    from operator_harness import Cluster, OperatorProcess
    from procs import free_port

    live, prom = free_port(), free_port()
    with kmock_api() as (url, emulator):
        cluster = Cluster(url, emulator)
        operator = OperatorProcess(
            write_kubeconfig(tmp_path / "kc", url),
            tmp_path / "op.log",
            "--liveness",
            f"http://127.0.0.1:{live}/healthz",
            "--metrics-port",
            str(prom),
            "--log-format",
            "json",
        )
        operator.start()
        try:
            doc = example("tiny-sim.yaml")
            cluster.create_md(doc)
            eventually(converged(cluster, doc, False), 30)
            assert eventually(
                lambda: httpx.get(f"http://127.0.0.1:{live}/healthz").status_code == 200, 20
            )
            text = httpx.get(f"http://127.0.0.1:{prom}/metrics").text
            assert 'ascend_serve_operator_reconciles_total{result="ok"}' in text
            assert "ascend_serve_operator_reconcile_duration_seconds_count" in text
            assert 'ascend_serve_operator_writes_total{verb="apply"}' in text
        finally:
            operator.stop()
    lines = [line for line in (tmp_path / "op.log").read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any("reconciled llm/tiny" in r["message"] for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
