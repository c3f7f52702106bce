"""`workload: auto` decides once: installing or removing the LeaderWorkerSet CRD later never
migrates running instances (each migration would restart every pod); it is reported, and only
an explicit spec.workload.kind moves them. Uses the real LeaderWorkerSet CRD (its controller
does not run here, so LeaderWorkerSets get no pods)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import httpx
import pytest

from apiserver.conftest import helm_install, helm_uninstall
from envtest import ControlPlane, eventually
from helpers import load_example
from kube import Kube
from procs import free_port


@pytest.fixture(scope="module")
def operator(plane: ControlPlane, kube: Kube, crd, tmp_path_factory) -> Iterator[Callable]:
    """The operator; its value waits until the operator sees the LWS CRD as installed or not
    (its metric), so a test's next step does not race the operator's CRD watch."""
    installation = helm_install(plane, kube, "wk", "wk-ops")
    port = free_port()
    process = installation.operator(
        tmp_path_factory.mktemp("wk") / "operator.log", "--metrics-port", str(port)
    )
    process.start()

    def sees_lws(installed: bool) -> None:
        line = f"ascend_serve_operator_leaderworkerset_available {float(installed)}"
        eventually(
            lambda: line in httpx.get(f"http://127.0.0.1:{port}/metrics").text,
            30,
            f"the operator sees the LWS CRD {'installed' if installed else 'removed'}",
        )

    try:
        yield sees_lws
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
    operator: Callable, kube: Kube, namespace: str, lws_crd
):
    lws_crd()  # start without LeaderWorkerSet
    operator(False)
    _deploy(kube, namespace, "early")
    eventually(lambda: _status(kube, namespace, "early").get("workloadKind") == "StatefulSet", 30)
    assert _kinds(kube, namespace, "early") == {"StatefulSet"}

    kube.install_crds(lws_crd_path())
    operator(True)
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
    operator(False)
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
