"""Every object name the docs, the chart's notes and the kind e2e script mention (`svc/X`,
`deployment/X`, "Service `X`", "`X` Service", ...) is one the renderer (or the chart) really
creates: a user's first `kubectl port-forward` must not fail on a wrong name."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache

import pytest
import yaml

from ascend_operator.planner import ClusterInfo, plan_manifest
from ascend_operator.render import render
from helpers import ROOT, example_paths

SOURCES = sorted(
    [
        ROOT / "README.md",
        *(p for p in (ROOT / "docs").rglob("*.md") if "reference" not in p.parts),
        ROOT / "charts" / "ascend-serve" / "templates" / "NOTES.txt",
        ROOT / "tests" / "e2e" / "kind" / "run.sh",
    ]
)
KINDS = {
    "svc": "Service",
    "service": "Service",
    "deploy": "Deployment",
    "deployment": "Deployment",
    "sts": "StatefulSet",
    "statefulset": "StatefulSet",
    "lws": "LeaderWorkerSet",
    "leaderworkerset": "LeaderWorkerSet",
    "cm": "ConfigMap",
    "configmap": "ConfigMap",
    "pdb": "PodDisruptionBudget",
    "md": "ModelDeployment",
}
PROSE_KINDS = (
    "Service|Deployment|StatefulSet|LeaderWorkerSet|ConfigMap|PodDisruptionBudget"
    "|ServiceAccount|RoleBinding|Role"
)
NAME = r"[A-Za-z0-9$<>{}._-]+"
PATTERNS = [
    re.compile(rf"\b(?P<kind>{'|'.join(KINDS)})/(?P<name>{NAME})"),
    re.compile(rf"\b(?P<kind>{PROSE_KINDS})s? `(?P<name>{NAME})`"),
    re.compile(rf"`(?P<name>{NAME})` (?P<kind>{PROSE_KINDS})\b"),
]
PLACEHOLDER = re.compile(r"<name>|\$\{?name\}?|\$\{?1\}?|<role>|<i>|<instance>|<n>|<ordinal>")
"""Placeholders in mentioned names: the deployment's name (`<name>`, `$name` and `$1` in
shell), a role, an instance or pod ordinal."""


def mentions() -> list[tuple[str, str, str]]:
    """(where, kind, name) of every object name mentioned."""
    found = []
    for path in SOURCES:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in PATTERNS:
                for m in pattern.finditer(line):
                    kind = KINDS.get(m["kind"].lower(), m["kind"])
                    if m["kind"] == "lws" and m["name"].startswith("releases"):
                        continue  # a URL path, not an object
                    found.append((f"{path.relative_to(ROOT)}:{lineno}", kind, m["name"]))
    return found


@cache
def created() -> dict[str, set[str]]:
    """Names by kind: every example rendered (both workload kinds), plus the chart."""
    names: dict[str, set[str]] = {}
    for path in example_paths():
        doc = yaml.safe_load(path.read_text())
        doc["metadata"]["namespace"] = "ns"
        names.setdefault("ModelDeployment", set()).add(doc["metadata"]["name"])
        for lws in (True, False):
            for obj in render(plan_manifest(doc, ClusterInfo(lws_available=lws))):
                names.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm not on PATH: run `make test` (scripts/install-tools.sh installs it)")
    chart = subprocess.run(
        [helm, "template", "ascend-serve", str(ROOT / "charts" / "ascend-serve")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for obj in yaml.safe_load_all(chart):
        if obj:
            names.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])
    return names


def _regex(name: str, deployment: str) -> re.Pattern[str]:
    parts, pos = [], 0
    for m in PLACEHOLDER.finditer(name):
        parts.append(re.escape(name[pos : m.start()]))
        token = m.group()
        if token == "<role>":
            parts.append("(unified|prefill|decode)")
        elif token in ("<i>", "<instance>", "<n>", "<ordinal>"):
            parts.append(r"\d+")
        else:
            parts.append(re.escape(deployment))
        pos = m.end()
    parts.append(re.escape(name[pos:]))
    return re.compile("".join(parts))


def test_docs_mention_object_names():
    assert len(mentions()) >= 8  # the patterns still find what the pages say


@pytest.mark.parametrize(("where", "kind", "name"), mentions(), ids=str)
def test_mentioned_object_exists(where: str, kind: str, name: str):
    known = created().get(kind, set())
    deployments = created()["ModelDeployment"]
    matches = any(
        _regex(name, deployment).fullmatch(candidate)
        for deployment in deployments
        for candidate in known
    )
    assert matches, f"{where}: {kind} {name!r} is not an object anything creates"


def test_placeholders_expand():
    assert _regex("<name>-<role>-http", "m").fullmatch("m-prefill-http")
    assert _regex("$name-router", "m").fullmatch("m-router")
    assert not _regex("<name>-router", "m").fullmatch("m")
