"""The real operator (subprocess) against KMock's API emulator, for what a real API server
cannot be made to do on demand: lose a response after storing the object, answer 429 and 500,
conflict on create, drop a watch. Everything else about the operator runs against a real
kube-apiserver in tests/apiserver (KMock enforces nothing: no schema, no RBAC, no server-side
apply ownership, no garbage collection)."""

from __future__ import annotations

import copy

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
        return all(
            contains({k: v for k, v in w.items() if k != "status"}, live[k])
            for k, w in want.items()
        )

    return check


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
