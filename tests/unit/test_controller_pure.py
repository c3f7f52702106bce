"""Status aggregation and PD rollout ordering (pure functions of the operator)."""

from __future__ import annotations

import copy

from ascend_operator.api import ModelDeployment
from ascend_operator.controller import rollout
from ascend_operator.controller.reconcile import contains, stamp, up_to_date
from ascend_operator.controller.status import Observed, aggregate, invalid_status
from ascend_operator.planner import ClusterInfo, Problem
from ascend_operator.planner.plan import plan
from ascend_operator.render import render
from helpers import load_example


def planned(name: str, lws: bool = True, **spec):
    doc = load_example(name)
    doc["metadata"]["uid"] = "u1"
    doc["spec"].update(spec)
    p = plan(ModelDeployment.from_manifest(doc), ClusterInfo(lws_available=lws))
    return p, [stamp(o) for o in render(p)]


def observed_from(objects, **statuses) -> Observed:
    obs = Observed()
    for o in objects:
        live = copy.deepcopy(o)
        live["status"] = statuses.get(o["metadata"]["name"], {})
        obs.objects[(o["kind"], o["metadata"]["name"])] = live
    return obs


def test_pending_then_ready_then_degraded():
    p, desired = planned("tiny-sim.yaml")
    empty = aggregate(p, desired, Observed(), 1, None)
    assert empty["phase"] == "Progressing"  # nothing exists yet: being created
    created = aggregate(p, desired, observed_from(desired), 1, None)
    assert created["phase"] == "Pending" and created["ready"] == "0/2"
    ready_obs = observed_from(
        desired,
        **{
            "tiny-unified": {"readyReplicas": 2, "updatedReplicas": 2},
            "tiny-router": {"readyReplicas": 1},
        },
    )
    ready = aggregate(p, desired, ready_obs, 1, created)
    assert ready["phase"] == "Ready" and ready["replicas"] == 2
    conditions = {c["type"]: c for c in ready["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["WorkloadFallback"]["status"] == "False"
    lost = observed_from(
        desired,
        **{
            "tiny-unified": {"readyReplicas": 1, "updatedReplicas": 2},
            "tiny-router": {"readyReplicas": 1},
        },
    )
    degraded = aggregate(p, desired, lost, 1, ready)
    assert degraded["phase"] == "Degraded"
    assert {c["type"]: c for c in degraded["conditions"]}["Degraded"]["status"] == "True"
    # a new generation that is not ready yet is progress, not degradation
    assert aggregate(p, desired, lost, 2, ready)["phase"] == "Progressing"


def test_transition_time_kept_while_status_unchanged():
    p, desired = planned("tiny-sim.yaml")
    first = aggregate(p, desired, observed_from(desired), 1, None)
    for c in first["conditions"]:
        c["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    second = aggregate(p, desired, observed_from(desired), 1, first)
    assert all(c["lastTransitionTime"] == "2020-01-01T00:00:00Z" for c in second["conditions"])


def test_statefulset_instances_count_ready_when_all_pods_are():
    p, desired = planned("qwen3-235b-multi-node.yaml", lws=False, replicas=2)
    obs = observed_from(
        desired,
        **{
            "qwen3-235b-2n-unified-0": {"readyReplicas": 2},
            "qwen3-235b-2n-unified-1": {"readyReplicas": 1},
        },
    )
    status = aggregate(p, desired, obs, 1, None)
    assert status["roles"][0]["readyInstances"] == 1
    fallback = {c["type"]: c for c in status["conditions"]}["WorkloadFallback"]
    assert fallback["status"] == "True" and fallback["reason"] == "LeaderWorkerSetMissing"


def test_apply_error_and_invalid_spec():
    p, desired = planned("tiny-sim.yaml")
    failed = aggregate(p, desired, Observed(), 1, None, apply_error="500: boom")
    assert failed["phase"] == "Failed"
    reconciled = {c["type"]: c for c in failed["conditions"]}["Reconciled"]
    assert reconciled["status"] == "False" and reconciled["message"] == "500: boom"
    invalid = invalid_status([Problem("spec.x", "bad", "fix it")], 3, failed)
    assert invalid["phase"] == "Failed" and invalid["observedGeneration"] == 3
    validated = {c["type"]: c for c in invalid["conditions"]}["Validated"]
    assert validated["status"] == "False" and "spec.x: bad. Fix: fix it" in validated["message"]


def _pd(max_num_seqs: int):
    doc_patch = {
        "runtime": {
            **load_example("tiny-sim-pd.yaml")["spec"]["runtime"],
            "maxNumSeqs": max_num_seqs,
        }
    }
    return planned("tiny-sim-pd.yaml", **doc_patch)


def test_pd_rollout_rolls_prefill_first_and_holds_decode():
    old_plan, old = _pd(64)
    new_plan, new = _pd(32)  # changes both roles' templates
    live = observed_from(
        old,
        **{
            "tiny-pd-prefill": {"readyReplicas": 2, "updatedReplicas": 2},
            "tiny-pd-decode": {"readyReplicas": 2, "updatedReplicas": 2},
        },
    )
    assert rollout.held_roles(new_plan, new, live) == ("decode",)
    applied = {
        (o["kind"], o["metadata"]["name"]): o
        for o in rollout.with_live_templates(new, live, ("decode",))
    }
    decode_lws = applied[("LeaderWorkerSet", "tiny-pd-decode")]
    old_decode = live.get("LeaderWorkerSet", "tiny-pd-decode")
    assert decode_lws["spec"]["leaderWorkerTemplate"] == old_decode["spec"]["leaderWorkerTemplate"]
    decode_cm = applied[("ConfigMap", "tiny-pd-decode-runtime")]
    assert decode_cm["data"] == live.get("ConfigMap", "tiny-pd-decode-runtime")["data"]
    prefill_lws = applied[("LeaderWorkerSet", "tiny-pd-prefill")]
    assert prefill_lws == next(
        o
        for o in new
        if o["metadata"]["name"] == "tiny-pd-prefill" and o["kind"] == "LeaderWorkerSet"
    )
    # prefill rolled and ready: decode may go
    rolled = observed_from(
        [
            prefill_lws
            if o["metadata"]["name"] == "tiny-pd-prefill" and o["kind"] == "LeaderWorkerSet"
            else o
            for o in old
        ],
        **{
            "tiny-pd-prefill": {"readyReplicas": 2, "updatedReplicas": 2},
            "tiny-pd-decode": {"readyReplicas": 2, "updatedReplicas": 2},
        },
    )
    assert rollout.held_roles(new_plan, new, rolled) == ()
    # scaling decode is never held: replicas come from the desired object
    scaled_plan, scaled = planned(
        "tiny-sim-pd.yaml",
        replicas=5,
        runtime={**load_example("tiny-sim-pd.yaml")["spec"]["runtime"], "maxNumSeqs": 32},
    )
    held = rollout.with_live_templates(scaled, live, ("decode",))
    assert (
        next(
            o
            for o in held
            if o["metadata"]["name"] == "tiny-pd-decode" and o["kind"] == "LeaderWorkerSet"
        )["spec"]["replicas"]
        == 5
    )
    assert old_plan.pd and scaled_plan.pd


def test_unified_never_holds():
    p, desired = planned("tiny-sim.yaml")
    assert rollout.held_roles(p, desired, Observed()) == ()


def test_up_to_date_detects_value_drift_and_spec_changes():
    _, desired = planned("tiny-sim.yaml")
    cm = next(o for o in desired if o["kind"] == "ConfigMap")
    live = copy.deepcopy(cm)
    live["metadata"]["resourceVersion"] = "9"  # server-added fields are fine
    assert up_to_date(cm, live)
    live["data"]["runtime.json"] = "{}"
    assert not up_to_date(cm, live)
    assert not up_to_date(cm, None)
    assert contains({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2, "c": 3}], "d": 4})
    assert not contains({"a": [1]}, {"a": [1, 2]})
