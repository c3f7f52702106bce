"""Which desired children may be applied now (pure).

PD rollout order: prefill first, then decode. While the prefill role's pods move to a new
template (or are not all ready), a changed decode template is held back: the decode workload
is still applied, with its live template (and its ConfigMap with its live runtime.json) and
the desired replica count, so scaling is never blocked. Old decode instances keep serving
while prefill rolls; decode rolls once every prefill instance runs the new template and is
ready. At most one role is mid-rollout.
"""

from __future__ import annotations

import copy
from typing import Any

from ..planner.plan import Plan
from .status import Observed, _template_hash, role_progress

ROLL_ORDER = ("prefill", "decode")


def _workloads(objects: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] in ("LeaderWorkerSet", "StatefulSet")
        and o["metadata"]["labels"].get("ascendserve.dev/role") == role
    ]


def held_roles(plan: Plan, desired: list[dict[str, Any]], observed: Observed) -> tuple[str, ...]:
    """Roles whose template change must wait for an earlier role to finish rolling."""
    if not plan.pd:
        return ()
    wanted = {(o["kind"], o["metadata"]["name"]): o for o in desired}
    prefill = plan.role("prefill")
    ready, rolling = role_progress(plan, prefill, wanted, observed)
    prefill_settled = not rolling and ready >= prefill.instances
    decode_changes = any(
        (live := observed.get(o["kind"], o["metadata"]["name"])) is not None
        and _template_hash(live) != _template_hash(o)
        for o in _workloads(desired, "decode")
    )
    return ("decode",) if decode_changes and not prefill_settled else ()


def with_live_templates(
    desired: list[dict[str, Any]], observed: Observed, held: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The desired objects, with the held roles' workloads keeping their live templates."""
    out = []
    for want in desired:
        role = want["metadata"]["labels"].get("ascendserve.dev/role")
        live = observed.get(want["kind"], want["metadata"]["name"])
        if role not in held or live is None:
            out.append(want)
            continue
        obj = copy.deepcopy(want)
        if obj["kind"] in ("LeaderWorkerSet", "StatefulSet"):
            key = "leaderWorkerTemplate" if obj["kind"] == "LeaderWorkerSet" else "template"
            obj["spec"][key] = copy.deepcopy(live["spec"][key])
        elif obj["kind"] == "ConfigMap":
            # the held pods' runtime.json must not change under them either
            obj["data"] = copy.deepcopy(live.get("data") or {})
        out.append(obj)
    return out
