"""The CRD on a real kube-apiserver: it installs, becomes Established, accepts every example and
refuses each CEL rule's invalid case with that rule's message."""

from __future__ import annotations

import copy

import pytest
import yaml

from apiserver.conftest import run_tool
from ascend_operator.planner import PlanError, plan_manifest
from cel_cases import CEL_CASES, RULE_OF, TYPE_CASES, UPSTREAM_ACCEPTED
from envtest import eventually
from helpers import ROOT, example_paths
from kube import ApiError, Kube

MD_CRD = "modeldeployments.ascendserve.dev"
UPSTREAM_DEPLOYMENTS = yaml.safe_load(
    (ROOT / "tests/fixtures/upstream_deployments.yaml").read_text()
)


def test_kubectl_server_side_apply_of_crds_folder(plane, kube: Kube):
    result = run_tool(plane, "kubectl", "apply", "--server-side", "-f", str(ROOT / "crds"))
    assert f"customresourcedefinition.apiextensions.k8s.io/{MD_CRD} serverside-applied" in (
        result.stdout
    )
    eventually(lambda: kube.established(MD_CRD), 30, "the CRD becomes Established")
    # Applying again (an upgrade with no change) is accepted too.
    run_tool(plane, "kubectl", "apply", "--server-side", "-f", str(ROOT / "crds"))


def _dry_run_create(kube: Kube, doc: dict, namespace: str) -> dict:
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return kube._call(
        "POST",
        kube.path("ModelDeployment", namespace),
        params={"dryRun": "All"},
        json=doc,
    )


@pytest.mark.parametrize("path", example_paths(), ids=lambda p: p.name)
def test_examples_are_accepted_and_defaulted(kube: Kube, crd, namespace, path):
    doc = yaml.safe_load(path.read_text())
    stored = _dry_run_create(kube, doc, namespace)
    spec = stored["spec"]
    # The server fills the schema's defaults, nested ones included.
    assert spec["runtime"]["blockSize"] >= 1
    for role in spec["roles"]:
        assert {"tensor", "pipeline", "prefillContext", "decodeContext"} <= set(role["parallelism"])
    assert spec["workload"]["kind"] in ("auto", "LeaderWorkerSet", "StatefulSet")


@pytest.mark.parametrize("case", sorted(CEL_CASES))
def test_each_cel_rule_rejects_its_case(kube: Kube, crd, namespace, case):
    with pytest.raises(ApiError) as info:
        _dry_run_create(kube, CEL_CASES[case], namespace)
    assert info.value.status == 422, info.value
    causes = [c.get("message", "") for c in info.value.body["details"]["causes"]]
    assert len(causes) == 1 and RULE_OF[case] in causes[0], causes


@pytest.mark.parametrize("case", sorted(TYPE_CASES))
def test_wrong_types_are_refused_as_the_planner_refuses_them(kube: Kube, crd, namespace, case):
    doc, path = TYPE_CASES[case]
    with pytest.raises(ApiError) as info:
        _dry_run_create(kube, doc, namespace)
    assert info.value.status == 422, info.value
    fields = [c.get("field", "") for c in info.value.body["details"]["causes"]]
    assert any(f.startswith(path) for f in fields), fields
    with pytest.raises(PlanError) as refused:
        plan_manifest(doc)
    assert any(p.path.startswith(path) for p in refused.value.problems), refused.value


def test_scale_subresource_and_printer_columns(plane, kube: Kube, crd, namespace):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-sim.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    kube.create(doc)
    name = doc["metadata"]["name"]
    run_tool(plane, "kubectl", "scale", "md", name, "-n", namespace, "--replicas=3")
    assert kube.get("ModelDeployment", namespace, name)["spec"]["replicas"] == 3
    out = run_tool(plane, "kubectl", "get", "md", "-n", namespace).stdout
    assert out.split()[:5] == ["NAME", "PHASE", "READY", "ROLES", "AGE"]


def test_one_message_per_problem(kube: Kube, crd, namespace):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-sim.yaml").read_text())
    doc["spec"]["replicas"] = -1
    with pytest.raises(ApiError) as info:
        _dry_run_create(kube, doc, namespace)
    causes = info.value.body["details"]["causes"]
    assert len(causes) == 1 and "replicas" in causes[0]["field"], causes


@pytest.mark.parametrize("case", sorted(UPSTREAM_ACCEPTED))
def test_what_upstream_runs_is_accepted_by_server_and_planner(kube: Kube, crd, namespace, case):
    _dry_run_create(kube, UPSTREAM_ACCEPTED[case], namespace)
    plan_manifest(UPSTREAM_ACCEPTED[case])


@pytest.mark.parametrize("case", sorted(UPSTREAM_DEPLOYMENTS["cases"]))
def test_upstream_deployments_are_accepted_and_kept_whole(kube: Kube, crd, namespace, case):
    """vllm-ascend's own deployments (tests/fixtures/upstream_deployments.yaml): the server takes
    them, and the additional config's free-form keys survive (not pruned) as written."""
    doc = copy.deepcopy(UPSTREAM_DEPLOYMENTS["cases"][case]["manifest"])
    doc["metadata"]["namespace"] = namespace
    stored = _dry_run_create(kube, doc, namespace)
    sent = [doc["spec"]["runtime"], *doc["spec"]["roles"]]
    kept = [stored["spec"]["runtime"], *stored["spec"]["roles"]]
    for before, after in zip(sent, kept, strict=True):
        assert after.get("additionalConfig", {}).get("extra") == before.get(
            "additionalConfig", {}
        ).get("extra")
