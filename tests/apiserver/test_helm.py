"""The Helm chart on a real API server: first install (CRDs included), upgrades between the two
RBAC scopes, the documented CRD upgrade, uninstall, and installs that fail leave nothing
behind."""

from __future__ import annotations

import pytest

from apiserver.conftest import CHART, run_tool
from envtest import ControlPlane, eventually
from helpers import ROOT
from kube import Kube

OUR_CRDS = (
    "modeldeployments.ascendserve.dev",
    "kopfpeerings.kopf.dev",
    "clusterkopfpeerings.kopf.dev",
)


def _release_objects(kube: Kube, release: str, namespaces: list[str]) -> set[tuple[str, str]]:
    """Cluster-scoped and namespaced objects helm created for `release`."""
    selector = f"app.kubernetes.io/instance={release}"
    found = {
        (kind, o["metadata"]["name"])
        for kind in ("ClusterRole", "ClusterRoleBinding")
        for o in kube.list(kind, None, labelSelector=selector)
    }
    for ns in namespaces:
        for kind in ("Role", "RoleBinding", "ServiceAccount", "Deployment", "Service", "ConfigMap"):
            found |= {
                (kind, f"{ns}/{o['metadata']['name']}")
                for o in kube.list(kind, ns, labelSelector=selector)
            }
    return found


def _operator_args(kube: Kube, namespace: str, release: str) -> list[str]:
    deployment = kube.get("Deployment", namespace, f"{release}-ascend-serve")
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def _helm(plane: ControlPlane, *args: str, check: bool = True):
    return run_tool(plane, "helm", *args, check=check)


def test_install_upgrade_between_scopes_and_uninstall(plane: ControlPlane, kube: Kube, tmp_path):
    # A first install: no CRD of ours exists yet.
    for crd in OUR_CRDS:
        kube.delete("CustomResourceDefinition", None, crd)
    for crd in OUR_CRDS:
        eventually(lambda c=crd: kube.get("CustomResourceDefinition", None, c) is None, 60)
    for ns in ("team-a", "team-b"):
        kube.create_namespace(ns)
    _helm(plane, "install", "hr", str(CHART), "-n", "hr-ops", "--create-namespace")
    for crd in OUR_CRDS:
        eventually(lambda c=crd: kube.established(c), 30, f"{crd} Established")
    cluster_scope = _release_objects(kube, "hr", ["hr-ops", "team-a", "team-b"])
    assert ("ClusterRole", "hr-ascend-serve") in cluster_scope
    assert "--all-namespaces" in _operator_args(kube, "hr-ops", "hr")

    _helm(
        plane, "upgrade", "hr", str(CHART), "-n", "hr-ops",
        "--set", "watch.scope=namespaced",
        "--set", "watch.namespaces={team-a,team-b}",
    )  # fmt: skip
    namespaced = _release_objects(kube, "hr", ["hr-ops", "team-a", "team-b"])
    assert ("ClusterRole", "hr-ascend-serve") not in namespaced
    assert {("Role", "team-a/hr-ascend-serve"), ("Role", "team-b/hr-ascend-serve")} <= namespaced
    args = _operator_args(kube, "hr-ops", "hr")
    assert "--namespace=team-a" in args and "--namespace=team-b" in args

    _helm(plane, "upgrade", "hr", str(CHART), "-n", "hr-ops", "--set", "watch.scope=cluster")
    assert _release_objects(kube, "hr", ["hr-ops", "team-a", "team-b"]) == cluster_scope

    # The documented CRD upgrade: helm created the CRDs (field manager "helm"), so applying a
    # changed CRD server-side conflicts; the docs' command (--force-conflicts) takes the
    # fields over.
    next_release = tmp_path / "crds"
    next_release.mkdir()
    for path in (CHART / "crds").glob("*.yaml"):
        text = path.read_text().replace("A model served on Ascend NPUs", "A model served on NPUs")
        (next_release / path.name).write_text(text)
    plain = run_tool(plane, "kubectl", "apply", "--server-side", "-f", str(next_release),
                     check=False)  # fmt: skip
    assert plain.returncode != 0 and "conflict" in plain.stderr.lower(), plain.stderr
    run_tool(
        plane, "kubectl", "apply", "--server-side", "--force-conflicts", "-f", str(next_release)
    )
    schema = kube.get("CustomResourceDefinition", None, OUR_CRDS[0])["spec"]["versions"][0]
    assert schema["schema"]["openAPIV3Schema"]["description"].startswith("A model served on NPUs")
    run_tool(
        plane, "kubectl", "apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds")
    )

    kube.create(
        {
            "apiVersion": "ascendserve.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "kept", "namespace": "team-a"},
            "spec": {
                "model": {"name": "m", "source": {"hostPath": {"path": "/m"}}},
                "runtime": {"engine": "sim"},
                "roles": [{"name": "unified"}],
            },
        }
    )
    _helm(plane, "uninstall", "hr", "-n", "hr-ops", "--wait")
    eventually(
        lambda: _release_objects(kube, "hr", ["hr-ops", "team-a", "team-b"]) == set(),
        30,
        "uninstall removes every release object",
    )
    # CRDs stay (Helm never deletes crds/), and so do the users' ModelDeployments.
    assert all(kube.established(c) for c in OUR_CRDS)
    assert kube.get("ModelDeployment", "team-a", "kept") is not None
    for ns in ("team-a", "team-b", "hr-ops"):
        kube.delete("Namespace", None, ns)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["watch.scope=everywhere"], "watch"),
        (
            ["watch.scope=namespaced", "watch.namespaces={nowhere}"],
            'watch.namespaces: namespace "nowhere" does not exist',
        ),
        (["replicaCount=-1"], "replicaCount"),
    ],
    ids=["bad-scope", "missing-namespace", "bad-replicas"],
)
def test_failed_install_leaves_nothing_behind(plane: ControlPlane, kube: Kube, sets, message):
    crds_before = {c["metadata"]["name"] for c in kube.list("CustomResourceDefinition", None)}
    args = ["install", "bad", str(CHART), "-n", "bad-ops", "--create-namespace"]
    for s in sets:
        args += ["--set", s]
    result = _helm(plane, *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "bad" not in _helm(plane, "list", "-A", "-a", "-q").stdout.split()
    assert _release_objects(kube, "bad", ["bad-ops"]) == set()
    crds_after = {c["metadata"]["name"] for c in kube.list("CustomResourceDefinition", None)}
    assert crds_after == crds_before
    kube.delete("Namespace", None, "bad-ops")


def test_chart_crd_is_the_generated_one():
    assert (CHART / "crds" / "modeldeployments.ascendserve.dev.yaml").read_text() == (
        ROOT / "crds" / "modeldeployments.ascendserve.dev.yaml"
    ).read_text()
