"""Status aggregation, rollouts and reconcile bookkeeping (pure functions of the operator)."""

from __future__ import annotations

import copy

from ascend_operator.api import ModelDeployment
from ascend_operator.controller.progress import Observed
from ascend_operator.controller.reconcile import (
    contains,
    notices,
    observed_children,
    recorded_workload,
    stamp,
    status_changed,
    up_to_date,
)
from ascend_operator.controller.rollout import plan_rollout
from ascend_operator.controller.status import aggregate, invalid_status
from ascend_operator.planner import ClusterInfo, Problem
from ascend_operator.planner.plan import plan
from ascend_operator.render import render
from ascend_operator.render.labels import TEMPLATE_HASH
from helpers import load_example, merge


def planned(name: str, lws: bool = True, recorded: str | None = None, **spec):
    doc = load_example(name)
    doc["metadata"]["uid"] = "u1"
    doc["spec"] = merge(doc["spec"], spec)
    p = plan(
        ModelDeployment.from_manifest(doc),
        ClusterInfo(lws_available=lws, recorded_workload=recorded),
    )
    return p, [stamp(o) for o in render(p)]


def observed_from(objects, **statuses) -> Observed:
    obs = Observed()
    for o in objects:
        live = copy.deepcopy(o)
        live["status"] = statuses.get(o["metadata"]["name"], {})
        obs.objects[(o["kind"], o["metadata"]["name"])] = live
    return obs


def status_of(p, desired, observed, generation=1, previous=None, **kw):
    return aggregate(p, plan_rollout(p, desired, observed), observed, generation, previous, **kw)


def conditions(status) -> dict:
    return {c["type"]: c for c in status["conditions"]}


READY_LWS = {"readyReplicas": 2, "updatedReplicas": 2}


def test_pending_then_ready_then_degraded():
    p, desired = planned("tiny-sim.yaml")
    empty = status_of(p, desired, Observed())
    assert empty["phase"] == "Progressing"  # nothing exists yet: being created
    created = status_of(p, desired, observed_from(desired))
    assert created["phase"] == "Pending" and created["ready"] == "0/2"
    assert status_of(p, desired, observed_from(desired), 1, created)["phase"] == "Pending"
    ready_obs = observed_from(
        desired, **{"tiny-unified": READY_LWS, "tiny-router": {"readyReplicas": 1}}
    )
    ready = status_of(p, desired, ready_obs, 1, created)
    assert ready["phase"] == "Ready" and ready["replicas"] == 2
    assert ready["workloadKind"] == "LeaderWorkerSet"
    assert conditions(ready)["Ready"]["status"] == "True"
    assert conditions(ready)["WorkloadFallback"]["status"] == "False"
    assert conditions(ready)["Progressing"]["status"] == "False"
    lost = observed_from(
        desired,
        **{
            "tiny-unified": {"readyReplicas": 1, "updatedReplicas": 2},
            "tiny-router": {"readyReplicas": 1},
        },
    )
    degraded = status_of(p, desired, lost, 1, ready)
    assert degraded["phase"] == "Degraded"
    assert conditions(degraded)["Degraded"]["status"] == "True"
    # a new generation that is not ready yet is progress, not degradation
    assert status_of(p, desired, lost, 2, ready)["phase"] == "Progressing"


def test_not_ready_until_the_controller_reports_the_new_generation():
    p, desired = planned("tiny-sim.yaml")
    obs = observed_from(desired, **{"tiny-unified": READY_LWS, "tiny-router": {"readyReplicas": 1}})
    obs.objects[("LeaderWorkerSet", "tiny-unified")]["metadata"]["generation"] = 3
    obs.objects[("LeaderWorkerSet", "tiny-unified")]["status"]["observedGeneration"] = 2
    assert status_of(p, desired, obs)["phase"] == "Progressing"
    obs.objects[("LeaderWorkerSet", "tiny-unified")]["status"]["observedGeneration"] = 3
    assert status_of(p, desired, obs)["phase"] == "Ready"


def test_transition_time_kept_while_status_unchanged():
    p, desired = planned("tiny-sim.yaml")
    first = status_of(p, desired, observed_from(desired))
    for c in first["conditions"]:
        c["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    second = status_of(p, desired, observed_from(desired), 1, first)
    assert all(c["lastTransitionTime"] == "2020-01-01T00:00:00Z" for c in second["conditions"])
    assert not status_changed(first, second)
    assert status_changed(first, {**second, "phase": "Ready"})


def test_statefulset_instances_count_ready_when_all_pods_are():
    p, desired = planned("qwen3-235b-multi-node.yaml", lws=False, replicas=2)
    obs = observed_from(
        desired,
        **{
            "qwen3-235b-2n-unified-0": {"readyReplicas": 2},
            "qwen3-235b-2n-unified-1": {"readyReplicas": 1},
        },
    )
    status = status_of(p, desired, obs, lws_available=False)
    assert status["roles"][0]["readyInstances"] == 1
    fallback = conditions(status)["WorkloadFallback"]
    assert fallback["status"] == "True" and fallback["reason"] == "LeaderWorkerSetMissing"


def test_apply_error_and_invalid_spec():
    p, desired = planned("tiny-sim.yaml")
    failed = status_of(p, desired, Observed(), apply_error="500: boom")
    assert failed["phase"] == "Failed"
    reconciled = conditions(failed)["Reconciled"]
    assert reconciled["status"] == "False" and reconciled["message"] == "500: boom"
    invalid = invalid_status([Problem("spec.x", "bad", "fix it")], 3, failed)
    assert invalid["phase"] == "Failed" and invalid["observedGeneration"] == 3
    validated = conditions(invalid)["Validated"]
    assert validated["status"] == "False" and "spec.x: bad. Fix: fix it" in validated["message"]
    # an Event for a new problem, once: not again while the message stays the same
    (notice,) = notices(failed, invalid)
    assert notice.reason == "InvalidSpec" and "spec.x" in notice.message
    assert notices(invalid, invalid) == []


def test_warnings_are_in_the_validated_condition_and_one_event():
    doc = load_example("tiny-sim-pd.yaml")
    doc["metadata"]["uid"] = "u1"
    doc["spec"]["roles"][0]["kvPort"] = 20000  # below the advised 28000: planned, with a warning
    p = plan(ModelDeployment.from_manifest(doc), ClusterInfo())
    desired = [stamp(o) for o in render(p)]
    (warning,) = p.warnings
    clean, _ = planned("tiny-sim-pd.yaml")
    before = status_of(clean, desired, Observed())
    warned = status_of(p, desired, Observed(), previous=before)
    validated = conditions(warned)["Validated"]
    assert validated["status"] == "True" and validated["reason"] == "ValidWithWarnings"
    assert "1 warning" in validated["message"] and str(warning) in validated["message"]
    assert "spec.roles[0].kvPort" in validated["message"]
    (notice,) = notices(before, warned)
    assert (notice.type, notice.reason) == ("Warning", "SpecWarnings")
    assert notices(warned, status_of(p, desired, Observed(), previous=warned)) == []


def _pd(max_num_seqs: int):
    return planned("tiny-sim-pd.yaml", runtime={"maxNumSeqs": max_num_seqs})


def _applied(rollout) -> dict:
    return {(o["kind"], o["metadata"]["name"]): o for o in rollout.objects}


def test_pd_rollout_rolls_prefill_first_and_holds_decode():
    _, old = _pd(64)
    new_plan, new = _pd(32)  # changes both roles' templates
    live = observed_from(old, **{"tiny-pd-prefill": READY_LWS, "tiny-pd-decode": READY_LWS})
    rollout = plan_rollout(new_plan, new, live)
    assert rollout.held_roles == ("decode",)
    applied = _applied(rollout)
    old_decode = live.get("LeaderWorkerSet", "tiny-pd-decode")
    assert (
        applied[("LeaderWorkerSet", "tiny-pd-decode")]["spec"]["leaderWorkerTemplate"]
        == old_decode["spec"]["leaderWorkerTemplate"]
    )
    assert (
        applied[("ConfigMap", "tiny-pd-decode-runtime")]["data"]
        == live.get("ConfigMap", "tiny-pd-decode-runtime")["data"]
    )
    new_prefill = next(o for o in new if o["metadata"]["name"] == "tiny-pd-prefill")
    assert applied[("LeaderWorkerSet", "tiny-pd-prefill")] == new_prefill
    status = aggregate(new_plan, rollout, live, 2, None)
    assert status["phase"] == "Progressing"
    assert (
        "decode waits until every prefill instance" in conditions(status)["Progressing"]["message"]
    )
    # prefill rolled and ready: decode may go
    rolled = observed_from(
        [new_prefill if o["metadata"]["name"] == "tiny-pd-prefill" else o for o in old],
        **{"tiny-pd-prefill": READY_LWS, "tiny-pd-decode": READY_LWS},
    )
    assert plan_rollout(new_plan, new, rolled).held_roles == ()
    # scaling decode is never held: replicas come from the desired object
    scaled_plan, scaled = planned("tiny-sim-pd.yaml", replicas=5, runtime={"maxNumSeqs": 32})
    held = _applied(plan_rollout(scaled_plan, scaled, live))
    assert held[("LeaderWorkerSet", "tiny-pd-decode")]["spec"]["replicas"] == 5


def test_unified_never_holds_a_role():
    p, desired = planned("tiny-sim.yaml")
    assert plan_rollout(p, desired, Observed()).held_roles == ()


def _sts(objects, index=None):
    return {
        o["metadata"]["name"]: o
        for o in objects
        if o["kind"] == "StatefulSet"
        and (index is None or o["metadata"]["name"].endswith(f"-{index}"))
    }


def _hash(obj) -> str:
    return obj["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH]


READY_STS = {"readyReplicas": 1, "updatedReplicas": 1}


def test_statefulset_rollout_moves_one_instance_at_a_time():
    _, old = planned("tiny-sim.yaml", lws=False, replicas=3)
    p, new = planned("tiny-sim.yaml", lws=False, replicas=3, runtime={"maxNumSeqs": 8})
    names = sorted(_sts(new))
    ready = dict.fromkeys(names, READY_STS) | {"tiny-router": {"readyReplicas": 1}}
    live = observed_from(old, **ready)
    rollout = plan_rollout(p, new, live)
    applied = _sts(rollout.objects)
    moved = [n for n in names if _hash(applied[n]) == _hash(_sts(new)[n])]
    assert moved == [names[0]]  # one instance, the others keep their live template
    assert rollout.held_instances == {"unified": 2}
    status = aggregate(p, rollout, live, 2, {"phase": "Ready", "observedGeneration": 1})
    assert status["phase"] == "Progressing"
    progressing = conditions(status)["Progressing"]
    assert progressing["reason"] == "RollingUpdate"
    assert (
        "unified 0/3 instances updated (2 waiting: at most 1 down at once)"
        in (progressing["message"])
    )
    assert conditions(status)["Degraded"]["status"] == "False"
    # the first instance moved but is not ready yet: nothing else moves
    live.objects[("StatefulSet", names[0])] = {**applied[names[0]], "status": {}}
    assert plan_rollout(p, new, live).held_instances == {"unified": 2}
    # it is ready: the next one moves
    live.objects[("StatefulSet", names[0])]["status"] = READY_STS
    rollout = plan_rollout(p, new, live)
    assert [n for n in names if _hash(_sts(rollout.objects)[n]) == _hash(_sts(new)[n])] == names[:2]
    updated = aggregate(p, rollout, live, 2, None)["roles"][0]
    assert updated["updatedInstances"] == 1 and updated["readyInstances"] == 3


def test_statefulset_rollout_moves_down_instances_at_once_and_respects_max_unavailable():
    _, old = planned("tiny-sim.yaml", lws=False, replicas=4)
    p, new = planned(
        "tiny-sim.yaml",
        lws=False,
        replicas=4,
        runtime={"maxNumSeqs": 8},
        workload={"maxUnavailable": 2},
    )
    names = sorted(_sts(new))
    statuses = dict.fromkeys(names, READY_STS)
    statuses[names[3]] = {"readyReplicas": 0}  # already down: moving it costs nothing
    rollout = plan_rollout(p, new, observed_from(old, **statuses))
    applied = _sts(rollout.objects)
    moved = [n for n in names if _hash(applied[n]) == _hash(_sts(new)[n])]
    # one unavailable already, budget 2: one ready instance moves, plus the down one
    assert moved == [names[0], names[3]]
    pdb = next(o for o in new if o["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 2


def test_statefulset_held_instance_keeps_its_pod_count():
    _, old = planned("qwen3-235b-multi-node.yaml", lws=False, replicas=2)
    p, new = planned("qwen3-235b-multi-node.yaml", lws=False, replicas=2, runtime={"maxNumSeqs": 8})
    statuses = {key: {"readyReplicas": 2, "updatedReplicas": 2} for key in _sts(new)}
    applied = _sts(plan_rollout(p, new, observed_from(old, **statuses)).objects)
    held = applied["qwen3-235b-2n-unified-1"]
    assert held["spec"]["template"] == _sts(old)["qwen3-235b-2n-unified-1"]["spec"]["template"]


def test_scale_up_creates_new_instances_on_the_new_template_at_once():
    _, old = planned("tiny-sim.yaml", lws=False, replicas=1)
    p, new = planned("tiny-sim.yaml", lws=False, replicas=3)
    rollout = plan_rollout(p, new, observed_from(old, **{"tiny-unified-0": READY_STS}))
    assert rollout.held_instances == {}
    assert set(_sts(rollout.objects)) == {f"tiny-unified-{i}" for i in range(3)}


def test_auto_keeps_the_recorded_workload_kind():
    lws_plan, _ = planned("tiny-sim.yaml", lws=False, recorded="LeaderWorkerSet")
    assert lws_plan.workload_kind == "LeaderWorkerSet"
    sts_plan, desired = planned("tiny-sim.yaml", lws=True, recorded="StatefulSet")
    assert sts_plan.workload_kind == "StatefulSet" and sts_plan.workload_fallback
    kept = conditions(status_of(sts_plan, desired, Observed()))["WorkloadFallback"]
    assert kept["reason"] == "KeptFromCreation" and "spec.workload.kind" in kept["message"]
    migrate, _ = planned(
        "tiny-sim.yaml", recorded="LeaderWorkerSet", workload={"kind": "StatefulSet"}
    )
    assert migrate.workload_kind == "StatefulSet"


def test_lws_removed_is_reported_not_migrated():
    p, desired = planned("tiny-sim.yaml", lws=False, recorded="LeaderWorkerSet")
    before = status_of(p, desired, observed_from(desired))
    after = status_of(p, desired, Observed(), 1, before, lws_available=False)
    assert after["phase"] == "Degraded" and after["workloadKind"] == "LeaderWorkerSet"
    available = conditions(after)["WorkloadAvailable"]
    assert available["status"] == "False" and available["reason"] == "LeaderWorkerSetMissing"
    assert conditions(after)["Degraded"]["reason"] == "WorkloadUnavailable"
    assert [n.reason for n in notices(before, after)] == ["WorkloadUnavailable"]
    assert notices(after, after) == []


def test_recorded_workload_from_status_or_children():
    _, desired = planned("tiny-sim.yaml", lws=False)
    obs = observed_from(desired)
    assert recorded_workload({"status": {"workloadKind": "LeaderWorkerSet"}}, obs) == (
        "LeaderWorkerSet"
    )
    assert recorded_workload({}, obs) == "StatefulSet"
    assert recorded_workload({}, Observed()) is None


def test_children_found_by_owner_reference():
    _, desired = planned("tiny-sim.yaml")
    stripped = copy.deepcopy(desired[0])
    stripped["metadata"]["labels"] = {}
    other = copy.deepcopy(desired[1])
    other["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    foreign = {"kind": "ConfigMap", "metadata": {"name": "x", "ownerReferences": []}}
    found = observed_children([stripped, other, foreign, *desired[2:]], "u1")
    key = (stripped["kind"], stripped["metadata"]["name"])
    assert key in found.objects and len(found.objects) == len(desired) - 1


def test_up_to_date_detects_value_drift_label_loss_and_spec_changes():
    _, desired = planned("tiny-sim.yaml")
    cm = next(o for o in desired if o["kind"] == "ConfigMap")
    live = copy.deepcopy(cm)
    live["metadata"]["resourceVersion"] = "9"  # server-added fields are fine
    assert up_to_date(cm, live)
    unlabelled = copy.deepcopy(live)
    del unlabelled["metadata"]["labels"]["app.kubernetes.io/managed-by"]
    assert not up_to_date(cm, unlabelled)
    live["data"]["runtime.json"] = "{}"
    assert not up_to_date(cm, live)
    assert not up_to_date(cm, None)
    assert contains({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2, "c": 3}], "d": 4})
    assert not contains({"a": [1]}, {"a": [1, 2]})


def test_workload_kind_recorded_only_once_a_workload_exists():
    p, desired = planned("tiny-sim.yaml")
    nothing_yet = status_of(p, desired, Observed(), apply_error="404: page not found")
    assert "workloadKind" not in nothing_yet
    created = status_of(p, desired, observed_from(desired), 1, nothing_yet)
    assert created["workloadKind"] == "LeaderWorkerSet"
