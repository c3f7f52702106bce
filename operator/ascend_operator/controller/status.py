"""Status of a ModelDeployment from what the cluster reports (pure: no I/O).

Phase rules:
- Failed: the spec is invalid (Validated=False), or applying children failed.
- Ready: every role has all desired instances ready, and the router too.
- Degraded: it was Ready for this generation and is no longer.
- Progressing: children are being created or rolled (or a PD rollout step waits).
- Pending: valid and applied, nothing ready yet, first time for this generation.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from ..planner.plan import Plan, RolePlan
from ..planner.problems import Problem, format_problems
from ..render import labels as lbl


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Observed:
    """Children as the API server reports them, by (kind, name)."""

    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))


def _template_hash(obj: dict[str, Any]) -> str | None:
    spec = obj.get("spec", {})
    template = (
        spec.get("template") or spec.get("leaderWorkerTemplate", {}).get("workerTemplate") or {}
    )
    return (template.get("metadata", {}).get("annotations") or {}).get(lbl.TEMPLATE_HASH)


def role_progress(
    plan: Plan, role: RolePlan, desired: dict[tuple[str, str], dict[str, Any]], observed: Observed
) -> tuple[int, bool]:
    """(ready instances, whether the role's pods still roll to the desired template)."""
    if plan.workload_kind == "LeaderWorkerSet":
        live = observed.get("LeaderWorkerSet", role.workload_name)
        want = desired.get(("LeaderWorkerSet", role.workload_name))
        if live is None or want is None:
            return 0, True
        status = live.get("status") or {}
        ready = int(status.get("readyReplicas") or 0)
        updated = int(status.get("updatedReplicas", role.instances) or 0)
        rolling = _template_hash(live) != _template_hash(want) or updated < role.instances
        return min(ready, role.instances), rolling
    ready, rolling = 0, False
    for (kind, name), want in desired.items():
        if kind != "StatefulSet" or want["metadata"]["labels"].get(lbl.ROLE_LABEL) != role.name:
            continue
        live = observed.get(kind, name)
        if live is None:
            rolling = True
            continue
        status = live.get("status") or {}
        if _template_hash(live) != _template_hash(want):
            rolling = True
        if int(status.get("readyReplicas") or 0) >= role.pods_per_instance:
            ready += 1
    return ready, rolling


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
            *[c for t, c in prev.items() if t in ("Ready", "Degraded", "WorkloadFallback")],
        ],
    }


def aggregate(
    plan: Plan,
    desired_objects: list[dict[str, Any]],
    observed: Observed,
    generation: int | None,
    previous: dict[str, Any] | None,
    *,
    apply_error: str | None = None,
    held: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Status from the plan, the desired children and the observed ones."""
    prev_status = previous or {}
    prev = {c["type"]: c for c in prev_status.get("conditions", [])}
    desired = {(o["kind"], o["metadata"]["name"]): o for o in desired_objects}
    roles, summary, all_ready, any_rolling = [], [], True, bool(held)
    total_ready = total_desired = 0
    for role in plan.roles:
        ready, rolling = role_progress(plan, role, desired, observed)
        any_rolling |= rolling
        all_ready &= ready >= role.instances
        total_ready += ready
        total_desired += role.instances
        roles.append(
            {
                "name": role.name,
                "desiredInstances": role.instances,
                "readyInstances": ready,
                "podsPerInstance": role.pods_per_instance,
                "workloadKind": plan.workload_kind,
            }
        )
        summary.append(f"{role.name} {ready}/{role.instances}")
    router = observed.get("Deployment", plan.router.name)
    router_ready = int(((router or {}).get("status") or {}).get("readyReplicas") or 0)
    all_ready &= router_ready >= plan.router.replicas
    scaled = next(r for r in roles if r["name"] == plan.scaled_role)

    same_generation = prev_status.get("observedGeneration") == generation
    was_ready = same_generation and prev_status.get("phase") in ("Ready", "Degraded")
    if apply_error:
        phase = "Failed"
    elif all_ready and not any_rolling:
        phase = "Ready"
    elif was_ready and not any_rolling:
        phase = "Degraded"
    elif total_ready == 0 and not same_generation and not any_rolling:
        phase = "Pending"
    else:
        phase = "Progressing"

    ready_message = (
        "every instance and the router are ready"
        if phase == "Ready"
        else f"ready: {', '.join(summary)}, router {router_ready}/{plan.router.replicas}"
    )
    if held:
        ready_message += f"; waiting to roll {', '.join(held)} until the previous role is ready"
    conditions = [
        _condition("Validated", True, "Valid", "the spec is valid", generation, prev),
        _condition(
            "Reconciled",
            apply_error is None,
            "ApplyFailed" if apply_error else "Applied",
            apply_error or f"{len(desired_objects)} objects applied",
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
            "Degraded",
            phase == "Degraded",
            "InstancesLost" if phase == "Degraded" else "AsDesired",
            ready_message if phase == "Degraded" else "no instance lost",
            generation,
            prev,
        ),
    ]
    conditions.append(
        _condition(
            "WorkloadFallback",
            plan.workload_fallback,
            "LeaderWorkerSetMissing" if plan.workload_fallback else "AsRequested",
            "the LeaderWorkerSet CRD is not installed: instances run as StatefulSets"
            if plan.workload_fallback
            else f"instances run as {plan.workload_kind}s",
            generation,
            prev,
        )
    )
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
    }
