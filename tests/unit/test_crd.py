"""The generated CRD: in sync with crds/ and the chart, structural, valid for Kubernetes, and
its CEL rules agree with the planner."""

from __future__ import annotations

import pytest
import yaml

from ascend_operator.api.crd import crd_manifest
from ascend_operator.planner import PlanError, plan_manifest
from cel import crd_violations, violations
from cel_cases import CEL_CASES, RULE_OF
from helpers import ROOT, example_paths

CRD_FILE = ROOT / "crds" / "modeldeployments.ascendserve.dev.yaml"
CHART_CRD = ROOT / "charts" / "ascend-serve" / "crds" / "modeldeployments.ascendserve.dev.yaml"


@pytest.fixture(scope="module")
def crd():
    return crd_manifest()


@pytest.mark.parametrize("path", [CRD_FILE, CHART_CRD], ids=["crds", "chart"])
def test_committed_crd_matches_models(crd, path):
    assert yaml.safe_load(path.read_text()) == crd, (
        f"{path.relative_to(ROOT)} drifted from the models: run `make crd`"
    )


def _nodes(node, path="self"):
    """(path, schema node) of every node below `node`, itself first."""
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{key}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_documented(crd):
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _nodes(schema["properties"]["spec"], "spec"):
        assert "$ref" not in node and "$defs" not in node, path
        assert node.get("type") or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf outside int-or-string"
        assert node.get("additionalProperties") is not False, path
        if path.count(".") >= 1 and not path.endswith(("[]", "}")):
            assert node.get("description"), f"{path} lacks a description (kubectl explain)"


def test_crd_metadata(crd):
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "modeldeployments.ascendserve.dev"
    assert spec["names"]["shortNames"] == ["md"]
    assert spec["scope"] == "Namespaced"
    version = spec["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Phase", "Ready", "Roles", "Age"} <= set(columns)


def test_crd_valid_for_kubernetes(crd):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(crd, "1.34", strict=True)


def test_crd_carries_cel_rules(crd):
    text = yaml.safe_dump(crd)
    for fragment in (
        "exactly one model source",
        "prefill and a decode role",
        "prefill parallelism.tensor must be >= decode",
        "pipeline and prefillContext cannot both",
        "multiples of numSpeculativeTokens",
    ):
        assert fragment in text


@pytest.mark.parametrize("path", example_paths(), ids=lambda p: p.name)
def test_examples_pass_cel(crd, path):
    assert crd_violations(crd, yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("case", sorted(CEL_CASES))
def test_cel_and_planner_agree(crd, case):
    doc = CEL_CASES[case]
    found = crd_violations(crd, doc)
    assert len(found) == 1 and RULE_OF[case] in found[0], f"{case}: {found}"
    with pytest.raises(PlanError):
        plan_manifest(doc)


def _rules(node):
    return [(p, r) for p, n in _nodes(node) for r in n.get("x-kubernetes-validations", [])]


def test_every_cel_rule_has_a_case(crd):
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    messages = {rule["message"] for _, rule in _rules(schema)}
    covered = {m for m in messages if any(frag in m for frag in RULE_OF.values())}
    assert covered == messages, f"CEL rules without an invalid case: {messages - covered}"


def test_every_default_satisfies_every_cel_rule(crd):
    """The API server evaluates a node's rules (and those below it) against its default as
    written, with no defaulting inside it: a rule reading a key the default lacks makes the
    whole CRD invalid. cel-python raises on a missing key just as the server does."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    checked = 0
    for path, node in _nodes(schema):
        if "default" not in node:
            continue
        assert violations(node, node["default"], path) == [], path
        checked += bool(_rules(node))
    assert checked >= 2  # runtime and parallelism carry rules and defaults


def test_committed_api_reference_matches_models():
    from ascend_operator.api.reference import api_reference

    committed = (ROOT / "docs/reference/api.md").read_text()
    assert committed == api_reference(), (
        "docs/reference/api.md drifted from the models: run `make crd`"
    )
    for field in ("kvConnector", "crossLayerLayout", "leaderWaitSeconds", "networkInterface"):
        assert f"`{field}`" in committed
