"""Which desired children may be applied now (pure).

A planned change to the pod template rolls each role a few instances at a time, in PD order:

- StatefulSet mode (one StatefulSet per instance): at most `spec.workload.maxUnavailable`
  instances of a role are down or moving at once; an instance moves to the new template only
  when the ones before it are back and ready. Instances that are already down move at once
  (holding them back would only keep a broken template), new instances (scale-up) start on the
  new template, and held instances keep their live template and pod count.
- LeaderWorkerSet mode: the LeaderWorkerSet controller rolls groups itself, with the same
  maxUnavailable rendered into its rolling-update configuration.
- PD: decode's template change waits until every prefill instance runs the new template and is
  ready. While held, the decode workloads keep their live templates and the decode ConfigMap
  its live runtime.json; the replica counts follow the spec, so scaling is never blocked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ascend_runtime.roles import PD_ROLES, Role

from ..kinds import WORKLOAD_KINDS
from ..planner.results import Plan
from ..render import labels as lbl
from .progress import (
    Observed,
    RoleProgress,
    role_progress,
    statefulset_instances,
    template_hash,
)

ROLL_ORDER = PD_ROLES


@dataclass
class Rollout:
    """What to apply now, and how far each role has come."""

    objects: list[dict[str, Any]]
    roles: dict[str, RoleProgress] = field(default_factory=dict)
    held_roles: tuple[str, ...] = ()
    """Roles whose template change waits for an earlier role."""
    held_instances: dict[str, int] = field(default_factory=dict)
    """Per role, instances kept on their live template by maxUnavailable."""


def _keep_live(want: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """`want` with the live pod template (and, for an instance StatefulSet, its pod count)."""
    obj = copy.deepcopy(want)
    if obj["kind"] == "LeaderWorkerSet":
        obj["spec"]["leaderWorkerTemplate"] = copy.deepcopy(live["spec"]["leaderWorkerTemplate"])
    elif obj["kind"] == "StatefulSet":
        obj["spec"]["template"] = copy.deepcopy(live["spec"]["template"])
        obj["spec"]["replicas"] = live["spec"].get("replicas", obj["spec"]["replicas"])
    elif obj["kind"] == "ConfigMap":
        obj["data"] = copy.deepcopy(live.get("data") or {})
    return obj


def _held_statefulsets(plan: Plan, role_name: str, desired: dict, observed: Observed) -> set:
    """StatefulSets of one role that keep their live template this pass (maxUnavailable)."""
    role = plan.role(role_name)
    instances = statefulset_instances(role, desired, observed)
    budget = plan.spec.workload.max_unavailable - sum(i.unavailable for i in instances)
    held = set()
    for instance in instances:
        if not instance.exists or instance.current:
            continue
        if not instance.ready:
            continue  # already down: moving it costs no availability
        if budget > 0:
            budget -= 1
        else:
            held.add(instance.key)
    return held


def plan_rollout(plan: Plan, desired: list[dict[str, Any]], observed: Observed) -> Rollout:
    """The objects to apply this pass (desired ones, some held on their live templates)."""
    wanted = {(o["kind"], o["metadata"]["name"]): o for o in desired}
    progress = {r.name: role_progress(plan, r, wanted, observed) for r in plan.roles}
    held_roles: list[str] = []
    if plan.pd:
        prefill = progress[Role.PREFILL]
        decode_changes = any(
            (live := observed.get(*key)) is not None and _changed(live, want)
            for key, want in wanted.items()
            if key[0] in WORKLOAD_KINDS and _role(want) == Role.DECODE
        )
        if decode_changes and not prefill.settled:
            held_roles.append(Role.DECODE)
    held_keys: set[tuple[str, str]] = set()
    held_instances: dict[str, int] = {}
    if plan.workload_kind == "StatefulSet":
        for role in plan.roles:
            if role.name in held_roles:
                continue
            keys = _held_statefulsets(plan, role.name, wanted, observed)
            held_keys |= keys
            if keys:
                held_instances[role.name] = len(keys)
    objects = []
    for key, want in wanted.items():
        live = observed.get(*key)
        hold = live is not None and (
            key in held_keys
            or (_role(want) in held_roles and key[0] in (*WORKLOAD_KINDS, "ConfigMap"))
        )
        objects.append(_keep_live(want, live) if hold and live is not None else want)
    return Rollout(objects, progress, tuple(held_roles), held_instances)


def _role(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get(lbl.ROLE_LABEL)


def _changed(live: dict[str, Any], want: dict[str, Any]) -> bool:
    return template_hash(live) != template_hash(want)
