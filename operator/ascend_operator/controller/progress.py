"""How far each workload has come, read from what its controller reports (pure: no I/O).

A workload is *current* when its live pod template is the desired one (same template hash),
*rolled* when its controller says every pod runs that template (observedGeneration caught up,
updateRevision == currentRevision, updatedReplicas == replicas; fields a status lacks count
as no evidence either way), and *ready* when enough pods are ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..planner.results import Plan, RolePlan
from ..render import labels as lbl


@dataclass
class Observed:
    """Children as the API server reports them, by (kind, name)."""

    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))


def template_hash(obj: dict[str, Any] | None) -> str | None:
    """The template-hash annotation of a workload's pod template."""
    spec = (obj or {}).get("spec", {})
    template = (
        spec.get("template") or spec.get("leaderWorkerTemplate", {}).get("workerTemplate") or {}
    )
    return (template.get("metadata", {}).get("annotations") or {}).get(lbl.TEMPLATE_HASH)


def rolled(live: dict[str, Any], replicas: int) -> bool:
    """Whether the workload's controller has moved every pod to its live template."""
    status = live.get("status") or {}
    generation = live.get("metadata", {}).get("generation")
    if generation is not None and int(status.get("observedGeneration") or 0) < int(generation):
        return False
    update = status.get("updateRevision")
    if update and status.get("currentRevision") != update:
        return False
    return not ("updatedReplicas" in status and int(status["updatedReplicas"] or 0) < replicas)


def ready_replicas(live: dict[str, Any] | None) -> int:
    return int(((live or {}).get("status") or {}).get("readyReplicas") or 0)


@dataclass(frozen=True)
class Instance:
    """One instance's workload (StatefulSet mode: one per instance)."""

    index: int
    key: tuple[str, str]
    exists: bool
    current: bool
    rolled: bool
    ready: bool

    @property
    def settled(self) -> bool:
        return self.exists and self.current and self.rolled and self.ready

    @property
    def unavailable(self) -> bool:
        """Down, or on its way to the new template (counts against maxUnavailable)."""
        return self.exists and not (self.ready and (self.rolled or not self.current))


@dataclass(frozen=True)
class RoleProgress:
    """Instances of one role: desired, ready, on the desired template."""

    name: str
    desired: int
    ready: int
    updated: int
    settled: bool
    """Every instance exists, runs the desired template and is ready."""
    rolling: bool
    """Some instance still has to move to the desired template."""


def statefulset_instances(
    role: RolePlan, desired: dict[tuple[str, str], dict[str, Any]], observed: Observed
) -> list[Instance]:
    out = []
    wanted = [
        (k, o)
        for k, o in desired.items()
        if k[0] == "StatefulSet" and o["metadata"]["labels"].get(lbl.ROLE_LABEL) == role.name
    ]
    for index, (key, want) in enumerate(sorted(wanted, key=lambda kv: _instance_index(kv[1]))):
        live = observed.get(*key)
        replicas = int((live or want)["spec"].get("replicas", 1))
        out.append(
            Instance(
                index=index,
                key=key,
                exists=live is not None,
                current=live is not None and template_hash(live) == template_hash(want),
                rolled=live is not None and rolled(live, replicas),
                ready=ready_replicas(live) >= role.pods_per_instance,
            )
        )
    return out


def _instance_index(obj: dict[str, Any]) -> int:
    return int(obj["spec"]["selector"]["matchLabels"].get(lbl.INSTANCE_LABEL, 0))


def role_progress(
    plan: Plan, role: RolePlan, desired: dict[tuple[str, str], dict[str, Any]], observed: Observed
) -> RoleProgress:
    """Progress of one role against the desired children."""
    if plan.workload_kind == "LeaderWorkerSet":
        key = ("LeaderWorkerSet", role.workload_name)
        live, want = observed.get(*key), desired.get(key)
        if live is None or want is None:
            return RoleProgress(role.name, role.instances, 0, 0, False, True)
        current = template_hash(live) == template_hash(want)
        done = rolled(live, role.instances)
        status = live.get("status") or {}
        updated = int(status.get("updatedReplicas", role.instances) or 0) if current else 0
        ready = min(ready_replicas(live), role.instances)
        return RoleProgress(
            role.name,
            role.instances,
            ready,
            min(updated, role.instances),
            settled=current and done and ready >= role.instances,
            rolling=not (current and done),
        )
    instances = statefulset_instances(role, desired, observed)
    return RoleProgress(
        role.name,
        role.instances,
        sum(i.ready for i in instances),
        sum(i.current and i.rolled for i in instances),
        settled=all(i.settled for i in instances),
        rolling=any(not (i.exists and i.current and i.rolled) for i in instances),
    )


def router_progress(plan: Plan, observed: Observed) -> tuple[int, bool]:
    """(ready router pods, whether the router Deployment still rolls)."""
    live = observed.get("Deployment", plan.router.name)
    if live is None:
        return 0, plan.router.replicas > 0
    return ready_replicas(live), not rolled(live, plan.router.replicas)
