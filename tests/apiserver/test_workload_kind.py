"""`workload: auto` decides once: installing or removing the LeaderWorkerSet CRD later never
migrates running instances (each migration would restart every pod); it is reported, and only
an explicit spec.workload.kind moves them. Uses the real LeaderWorkerSet CRD (its controller
does not run here, so LeaderWorkerSets get no pods)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest

from apiserver.conftest import helm_install, helm_uninstall
from envtest import ControlPlane, eventually
from helpers import load_example
from kube import Kube
from operator_harness import OperatorProcess


@pytest.fixture(scope="module")
def operator(plane: ControlPlane, kube: Kube, crd, tmp_path_factory) -> Iterator[OperatorProcess]:
    installation = helm_install(plane, kube, "wk", "wk-ops")
    process = installation.operator(tmp_path_factory.mktemp("wk") / "operator.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
        helm_uninstall(plane, "wk", "wk-ops")
        kube.delete("Namespace", None, "wk-ops")


def _deploy(kube: Kube, namespace: str, name: str) -> dict:
    doc = load_example("tiny-sim.yaml")
    doc["metadata"] = {"name": name, "namespace": namespace}
    kube.create(copy.deepcopy(doc))
    return doc


def _status(kube: Kube, namespace: str, name: str) -> dict:
    return (kube.get("ModelDeployment", namespace, name) or {}).get("status") or {}


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def _kinds(kube: Kube, namespace: str, name: str) -> set[str]:
    return {
        kind
        for kind, _ in kube.owned(namespace)
        if kind in ("StatefulSet", "LeaderWorkerSet")
        and any(n.startswith(name) for k, n in kube.owned(namespace) if k == kind)
    }


def test_kind_is_kept_when_the_lws_crd_comes_and_goes(
    operator: OperatorProcess, kube: Kube, namespace: str, lws_crd
):
    lws_crd()  # start without LeaderWorkerSet
    _deploy(kube, namespace, "early")
    eventually(lambda: _status(kube, namespace, "early").get("workloadKind") == "StatefulSet", 30)
    assert _kinds(kube, namespace, "early") == {"StatefulSet"}

    kube.install_crds(lws_crd_path())
    kube.merge("ModelDeployment", namespace, "early", {"spec": {"replicas": 3}})
    eventually(
        lambda: kube.get("StatefulSet", namespace, "early-unified-2") is not None,
        30,
        "the edit is applied",
    )
    assert _kinds(kube, namespace, "early") == {"StatefulSet"}, "migrated on its own"
    fallback = eventually(
        lambda: (
            _condition(_status(kube, namespace, "early"), "WorkloadFallback").get("reason")
            == "KeptFromCreation"
            and _condition(_status(kube, namespace, "early"), "WorkloadFallback")
        ),
        30,
    )
    assert "spec.workload.kind: LeaderWorkerSet to migrate" in fallback["message"]

    _deploy(kube, namespace, "late")
    eventually(
        lambda: kube.get("LeaderWorkerSet", namespace, "late-unified") is not None,
        60,
        "a new deployment uses LeaderWorkerSet now that it is installed",
    )
    eventually(
        lambda: _status(kube, namespace, "late").get("workloadKind") == "LeaderWorkerSet", 30
    )

    lws_crd()  # LeaderWorkerSet removed: its objects go with it
    status = eventually(
        lambda: (
            (s := _status(kube, namespace, "late"))
            and _condition(s, "WorkloadAvailable").get("status") == "False"
            and s
        ),
        60,
        "reported, not migrated",
    )
    assert status["phase"] == "Degraded" and status["workloadKind"] == "LeaderWorkerSet"
    events = eventually(
        lambda: [
            e
            for e in kube.list("Event", namespace)
            if e.get("reason") == "WorkloadUnavailable" and e["involvedObject"]["name"] == "late"
        ],
        30,
    )
    assert "spec.workload.kind: StatefulSet" in events[0]["message"]
    assert kube.get("StatefulSet", namespace, "late-unified-0") is None
    assert _kinds(kube, namespace, "early") == {"StatefulSet"}

    kube.merge(
        "ModelDeployment", namespace, "late", {"spec": {"workload": {"kind": "StatefulSet"}}}
    )
    eventually(
        lambda: kube.get("StatefulSet", namespace, "late-unified-1") is not None,
        30,
        "an explicit kind migrates",
    )
    eventually(lambda: _status(kube, namespace, "late").get("workloadKind") == "StatefulSet", 30)


def lws_crd_path():
    from apiserver.conftest import lws_crd_file

    return lws_crd_file()
