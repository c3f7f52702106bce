"""Status of a ModelDeployment from what the cluster reports (pure: no I/O).

Phase rules, first match wins:
- Failed: the spec is invalid (Validated=False), or applying children failed.
- Ready: every role's instances run the desired template and are ready, and the router too.
- Progressing: a rollout is under way (instances move to a new template, or a PD role waits
  for the one before it). A planned rollout is never Degraded.
- Degraded: it was Ready for this generation and lost instances since, or its workload kind
  is no longer served (the LeaderWorkerSet CRD was removed).
- Pending: valid and applied, nothing ready yet, and nothing was for this generation.
- Progressing otherwise (instances starting, scaling up).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..planner.problems import Problem, format_problems
from ..planner.results import Plan
from ..render import labels as lbl
from .progress import Observed, router_progress
from .rollout import ROLL_ORDER, Rollout

__all__ = ["Observed", "aggregate", "invalid_status", "now_iso"]

KEPT_WHEN_INVALID = ("Ready", "Progressing", "Degraded", "WorkloadFallback", "WorkloadAvailable")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _condition(  # noqa: PLR0917 - a condition is exactly these six things
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int | None,
    previous: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(type_)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == status and old.get("lastTransitionTime")
        else now_iso()
    )
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


VALID_WITH_WARNINGS = "ValidWithWarnings"
"""The Validated condition's reason when the plan carries warnings (each also an Event)."""


def _validated(
    plan: Plan, generation: int | None, prev: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    if not plan.warnings:
        return _condition("Validated", True, "Valid", "the spec is valid", generation, prev)
    count = len(plan.warnings)
    message = (
        f"the spec is valid, with {count} warning{'s' if count != 1 else ''}:\n"
        + format_problems(plan.warnings)
    )
    return _condition("Validated", True, VALID_WITH_WARNINGS, message, generation, prev)


def invalid_status(
    problems: list[Problem], generation: int | None, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Validated=False with every problem; nothing else is touched."""
    prev = {c["type"]: c for c in (previous or {}).get("conditions", [])}
    message = format_problems(problems)
    return {
        "observedGeneration": generation,
        "phase": "Failed",
        "conditions": [
            _condition("Validated", False, "InvalidSpec", message, generation, prev),
            _condition(
                "Reconciled",
                False,
                "InvalidSpec",
                "children were left as they were; fix the spec",
                generation,
                prev,
            ),
            *[c for t, c in prev.items() if t in KEPT_WHEN_INVALID],
        ],
    }


def _rollout_message(plan: Plan, rollout: Rollout, router_rolling: bool) -> str:
    parts = []
    for role in plan.roles:
        progress = rollout.roles[role.name]
        if role.name in rollout.held_roles:
            before = ROLL_ORDER[ROLL_ORDER.index(role.name) - 1]
            parts.append(f"{role.name} waits until every {before} instance is updated and ready")
        elif progress.rolling:
            text = f"{role.name} {progress.updated}/{progress.desired} instances updated"
            if rollout.held_instances.get(role.name):
                text += (
                    f" ({rollout.held_instances[role.name]} waiting: at most "
                    f"{plan.spec.workload.max_unavailable} down at once)"
                )
            parts.append(text)
    if router_rolling:
        parts.append("router rolling")
    return "; ".join(parts)


def _workload_conditions(
    plan: Plan, lws_available: bool, generation: int | None, prev: dict[str, Any]
) -> list[dict[str, Any]]:
    auto_sts = plan.spec.workload.kind == "auto" and plan.workload_kind == "StatefulSet"
    if not auto_sts:
        fallback = ("AsRequested", f"instances run as {plan.workload_kind}s")
    elif lws_available:
        fallback = (
            "KeptFromCreation",
            "instances stay StatefulSets, the kind chosen when this deployment was created "
            "(LeaderWorkerSet was not installed then); set spec.workload.kind: "
            "LeaderWorkerSet to migrate",
        )
    else:
        fallback = (
            "LeaderWorkerSetMissing",
            "the LeaderWorkerSet CRD is not installed: instances run as StatefulSets",
        )
    missing = plan.workload_kind == "LeaderWorkerSet" and not lws_available
    available = (
        (
            "LeaderWorkerSetMissing",
            "the LeaderWorkerSet CRD is not installed (any more): instances are not migrated "
            "on their own; reinstall LeaderWorkerSet, or set spec.workload.kind: StatefulSet "
            "to move them to StatefulSets",
        )
        if missing
        else ("Served", f"{plan.workload_kind} is served by the API server")
    )
    return [
        _condition("WorkloadFallback", auto_sts, *fallback, generation, prev),
        _condition("WorkloadAvailable", not missing, *available, generation, prev),
    ]


def _progressing_reason(phase: str, rolling: bool) -> str:
    if rolling:
        return "RollingUpdate"
    return "InstancesStarting" if phase == "Progressing" else "Stable"


def aggregate(
    plan: Plan,
    rollout: Rollout,
    observed: Observed,
    generation: int | None,
    previous: dict[str, Any] | None,
    *,
    apply_error: str | None = None,
    lws_available: bool = True,
) -> dict[str, Any]:
    """Status from the plan, this pass's rollout and the observed children."""
    prev_status = previous or {}
    prev = {c["type"]: c for c in prev_status.get("conditions", [])}
    roles, summary = [], []
    all_ready, rolling = True, bool(rollout.held_roles)
    total_ready = total_desired = 0
    for role in plan.roles:
        progress = rollout.roles[role.name]
        rolling |= progress.rolling
        all_ready &= progress.settled
        total_ready += progress.ready
        total_desired += role.instances
        roles.append(
            {
                "name": role.name,
                "desiredInstances": role.instances,
                "readyInstances": progress.ready,
                "updatedInstances": progress.updated,
                "podsPerInstance": role.pods_per_instance,
                "workloadKind": plan.workload_kind,
            }
        )
        summary.append(f"{role.name} {progress.ready}/{role.instances}")
    router_ready, router_rolling = router_progress(plan, observed)
    rolling |= router_rolling
    all_ready &= router_ready >= plan.router.replicas
    unavailable = plan.workload_kind == "LeaderWorkerSet" and not lws_available
    scaled = next(r for r in roles if r["name"] == plan.scaled_role)

    same_generation = prev_status.get("observedGeneration") == generation
    was_ready = same_generation and prev_status.get("phase") in ("Ready", "Degraded")
    if apply_error:
        phase = "Failed"
    elif unavailable:
        phase = "Degraded"
    elif all_ready and not rolling:
        phase = "Ready"
    elif rolling:
        phase = "Progressing"
    elif was_ready:
        phase = "Degraded"
    elif total_ready == 0 and (not same_generation or prev_status.get("phase") == "Pending"):
        phase = "Pending"
    else:
        phase = "Progressing"

    ready_message = (
        "every instance and the router are ready"
        if phase == "Ready"
        else f"ready: {', '.join(summary)}, router {router_ready}/{plan.router.replicas}"
    )
    rollout_message = _rollout_message(plan, rollout, router_rolling)
    conditions = [
        _validated(plan, generation, prev),
        _condition(
            "Reconciled",
            apply_error is None,
            "ApplyFailed" if apply_error else "Applied",
            apply_error or f"{len(rollout.objects)} objects applied",
            generation,
            prev,
        ),
        _condition(
            "Ready",
            phase == "Ready",
            "AllInstancesReady" if phase == "Ready" else "InstancesNotReady",
            ready_message,
            generation,
            prev,
        ),
        _condition(
            "Progressing",
            phase == "Progressing",
            _progressing_reason(phase, rolling),
            (rollout_message or ready_message)
            if phase == "Progressing"
            else "no rollout in progress",
            generation,
            prev,
        ),
        _condition(
            "Degraded",
            phase == "Degraded",
            ("WorkloadUnavailable" if unavailable else "InstancesLost")
            if phase == "Degraded"
            else "AsDesired",
            ready_message if phase == "Degraded" else "no instance lost",
            generation,
            prev,
        ),
        *_workload_conditions(plan, lws_available, generation, prev),
    ]
    selector = lbl.selector_string(lbl.selector(plan.name, plan.scaled_role))
    return {
        "observedGeneration": generation,
        "phase": phase,
        "conditions": conditions,
        "roles": roles,
        "replicas": scaled["readyInstances"],
        "selector": selector,
        "ready": f"{total_ready}/{total_desired}",
        "roleSummary": ", ".join(summary),
        "routerEndpoint": plan.router.endpoint,
        **_recorded_kind(plan, observed, prev_status),
    }


def _recorded_kind(plan: Plan, observed: Observed, previous: dict[str, Any]) -> dict[str, str]:
    """status.workloadKind: recorded once a workload of the planned kind exists (a first
    pass that failed to create one, say because the CRD just went away, decides nothing)."""
    if any(kind == plan.workload_kind for kind, _ in observed.objects):
        return {"workloadKind": plan.workload_kind}
    return {"workloadKind": previous["workloadKind"]} if previous.get("workloadKind") else {}
