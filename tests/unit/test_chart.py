"""The Helm chart: lints, renders, validates, and its RBAC covers what the operator creates.

Needs helm (installed into .venv/bin by `make test`); skipped with a message otherwise."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from ascend_operator.render import render
from helpers import ROOT, example_paths

CHART = ROOT / "charts" / "ascend-serve"
HELM = shutil.which("helm")
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm not on PATH: run `make test` (scripts/install-tools.sh installs it)"
)
kubernetes_validate = pytest.importorskip("kubernetes_validate")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check)


def template(*sets: str) -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", "ops"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def test_lint():
    result = helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in result.stdout


def test_default_render_is_valid_kubernetes():
    objs = template()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    for obj in objs:
        kubernetes_validate.validate(obj, "1.34", strict=True)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["operator", "--all-namespaces", "--standalone"]
    assert "--liveness=http://0.0.0.0:8081/healthz" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_crds_ship_in_chart():
    crd = yaml.safe_load((CHART / "crds" / "modeldeployments.ascendserve.dev.yaml").read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    for doc in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()):
        kubernetes_validate.validate(doc, "1.34", strict=True)


def test_namespaced_scope_and_peering():
    objs = template(
        "watch.scope=namespaced",
        "watch.namespaces={team-a,team-b}",
        "replicaCount=2",
        "metrics.serviceMonitor.enabled=true",
    )
    roles = [o for o in objs if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert not any(
        o["kind"] == "ClusterRole" and o["metadata"]["name"] == "rel-ascend-serve" for o in objs
    )
    discovery = next(o for o in objs if o["kind"] == "ClusterRole")
    assert any("namespaces" in r["resources"] for r in discovery["rules"])  # kopf needs them
    cluster_scope = next(o for o in template() if o["kind"] == "ClusterRole")
    assert all("namespaces" not in r["resources"] for r in cluster_scope["rules"])
    args = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--peering=rel-ascend-serve" in args and "--standalone" not in args
    assert any(o["kind"] == "ServiceMonitor" for o in objs)
    peerings = [o for o in objs if o["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    cluster_peering = template("replicaCount=3")
    assert [o["kind"] for o in cluster_peering].count("ClusterKopfPeering") == 1


def test_values_schema_rejects_bad_values():
    result = helm("template", "rel", str(CHART), "--set", "watch.scope=everywhere", check=False)
    assert result.returncode != 0 and "watch/scope" in result.stderr
    result = helm("template", "rel", str(CHART), "--set", "replicaCount=0", check=False)
    assert result.returncode != 0 and "replicaCount" in result.stderr


_PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "LeaderWorkerSet": "leaderworkersets",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Role": "roles",
    "RoleBinding": "rolebindings",
}


def test_rbac_covers_every_rendered_kind():
    rules = next(
        o
        for o in template()
        if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "rel-ascend-serve"
    )["rules"]
    granted = {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    kinds = set()
    for path in example_paths():
        doc = yaml.safe_load(path.read_text())
        for lws in (True, False):
            from ascend_operator.api import ModelDeployment
            from ascend_operator.planner import ClusterInfo
            from ascend_operator.planner.plan import plan

            kinds |= {
                (o["apiVersion"], o["kind"])
                for o in render(
                    plan(ModelDeployment.from_manifest(doc), ClusterInfo(lws_available=lws))
                )
            }
    for api_version, kind in kinds:
        group = api_version.split("/")[0] if "/" in api_version else ""
        for verb in ("list", "watch", "create", "patch", "delete"):
            assert (group, _PLURALS[kind], verb) in granted, (kind, verb)
    # the router Role grants endpointslices; RBAC requires the operator to hold them too
    assert ("discovery.k8s.io", "endpointslices", "watch") in granted


def test_grafana_dashboard_ships_and_queries_metrics_we_export():
    import json
    import re

    from prometheus_client.metrics import MetricWrapperBase

    from ascend_operator.controller import metrics as operator_metrics
    from ascend_runtime.router.app import RouterMetrics

    objs = template()
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["ascend-serve.json"])
    assert dashboard["uid"] == "ascend-serve" and len(dashboard["panels"]) >= 8
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    queried = {
        re.sub(r"_(total|bucket|sum|count)$", "", m) for m in re.findall(r"ascend_serve_\w+", exprs)
    }
    operator_families = [
        fam
        for obj in vars(operator_metrics).values()
        if isinstance(obj, MetricWrapperBase)
        for fam in obj.collect()
    ]
    exported = {fam.name for fam in [*RouterMetrics().registry.collect(), *operator_families]}
    assert queried - exported == set(), "the dashboard queries metrics nobody exports"
    assert not [o for o in template("grafana.dashboard.enabled=false") if o["kind"] == "ConfigMap"]


def test_pod_monitor_selects_what_the_operator_renders():
    """The PodMonitor's selector matches the labels the renderer puts on router and engine
    pods (one home: render/labels.py), so the dashboard's router panels have data."""
    from ascend_operator.render import labels

    (monitor,) = [
        o for o in template("metrics.podMonitor.enabled=true") if o["kind"] == "PodMonitor"
    ]
    wanted = monitor["spec"]["selector"]["matchLabels"]
    for component in ("router", "prefill", "unified"):
        pod_labels = labels.common("qwen", component)
        assert all(pod_labels.get(k) == v for k, v in wanted.items()), (component, wanted)
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    sources = {r["sourceLabels"][0] for r in endpoint["relabelings"]}
    for label in (labels.DEPLOYMENT_LABEL, labels.ROLE_LABEL):  # Prometheus' escaped names
        meta = "__meta_kubernetes_pod_label_" + label.replace(".", "_").replace("/", "_")
        assert meta in sources, meta
    namespaced = template(
        "metrics.podMonitor.enabled=true", "watch.scope=namespaced", "watch.namespaces={a,b}"
    )
    (scoped,) = [o for o in namespaced if o["kind"] == "PodMonitor"]
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}
    own = template("metrics.podMonitor.enabled=true", "watch.scope=namespaced")
    (mine,) = [o for o in own if o["kind"] == "PodMonitor"]
    assert mine["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
    assert not [o for o in template() if o["kind"] == "PodMonitor"]  # off by default
