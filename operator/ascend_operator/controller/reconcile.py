"""One reconcile pass of a ModelDeployment: plan, render, apply what differs (a rollout a few
instances at a time), prune what the plan no longer has, and compute the status. An invalid
spec touches no child; a workload kind the API server stopped serving is reported, not
migrated."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import astuple, dataclass, field
from typing import Any

from ..api.resource import GROUP, KIND
from ..kinds import REFERENCED_KINDS, WORKLOAD_KINDS
from ..planner import ClusterInfo, Plan, PlanError, plan_manifest
from ..render import render
from .kube import KubeClient, KubeError
from .progress import Observed
from .rollout import plan_rollout
from .status import VALID_WITH_WARNINGS, aggregate, invalid_status

log = logging.getLogger("ascend_operator.reconcile")

DESIRED_HASH = "ascendserve.dev/desired-hash"
LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"


@dataclass(frozen=True)
class Notice:
    """A Kubernetes Event to post about the ModelDeployment."""

    type: str
    reason: str
    message: str


@dataclass
class Outcome:
    """What one pass did."""

    status: dict[str, Any]
    applied: int = 0
    deleted: int = 0
    valid: bool = True
    error: KubeError | None = None
    problems: str = ""
    notices: list[Notice] = field(default_factory=list)
    written: dict[tuple[str, str], str] = field(default_factory=dict)
    """resourceVersion of each child this pass wrote, by (kind, name)."""


def desired_hash(obj: dict[str, Any]) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stamp(obj: dict[str, Any]) -> dict[str, Any]:
    """The object with the hash of its desired form in an annotation (drift detection).
    Shares everything but its metadata with `obj`."""
    meta = obj["metadata"]
    annotations = {**(meta.get("annotations") or {}), DESIRED_HASH: desired_hash(obj)}
    return {**obj, "metadata": {**meta, "annotations": annotations}}


@dataclass
class DesiredCache:
    """Plans and stamped children by what they depend on (the spec, the object's identity and
    what the cluster offers), so the many passes a burst of child events causes re-plan and
    re-render only when something they depend on changed. Least recently used go first."""

    size: int = 4096
    _entries: OrderedDict[str, tuple[Plan, list[dict[str, Any]]]] = field(
        default_factory=OrderedDict
    )

    def get(
        self, manifest: dict[str, Any], cluster: ClusterInfo
    ) -> tuple[Plan, list[dict[str, Any]]]:
        """(plan, stamped desired children); raises PlanError for an invalid spec."""
        meta = manifest["metadata"]
        key = json.dumps(
            [meta.get("uid"), meta.get("name"), meta.get("namespace"), manifest["spec"],
             astuple(cluster)],
            sort_keys=True,
            default=str,
        )  # fmt: skip
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        plan = plan_manifest(manifest, cluster)
        entry = (plan, [stamp(o) for o in render(plan)])
        self._entries[key] = entry
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry


def contains(want: Any, live: Any) -> bool:
    """Every field we set is present in `live` with our value (servers add defaults)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in live and contains(v, live[k]) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(live, list)
            and len(want) == len(live)
            and all(contains(w, x) for w, x in zip(want, live, strict=True))
        )
    return want == live


def up_to_date(want: dict[str, Any], live: dict[str, Any] | None) -> bool:
    if live is None:
        return False
    annotations = live.get("metadata", {}).get("annotations") or {}
    if annotations.get(DESIRED_HASH) != want["metadata"]["annotations"][DESIRED_HASH]:
        return False
    body = {k: v for k, v in want.items() if k not in ("metadata", "status")}
    return contains(body, live) and contains(
        want["metadata"].get("labels", {}), live["metadata"].get("labels") or {}
    )


def controller_owner(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the ModelDeployment that controls `obj`, from its owner references:
    how children are found, whatever happened to their labels."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if (
            ref.get("controller")
            and ref.get("kind") == KIND
            and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")
        ):
            return ref.get("name"), ref.get("uid")
    return None


def observed_children(children: Iterable[dict[str, Any]], uid: str | None) -> Observed:
    """The children a ModelDeployment of this uid controls (an older namesake's are left to
    the garbage collector)."""
    observed = Observed()
    for obj in children:
        owner = controller_owner(obj)
        if owner is not None and (not uid or owner[1] == uid):
            observed.objects[(obj["kind"], obj["metadata"]["name"])] = obj
    return observed


def recorded_workload(body: dict[str, Any], observed: Observed) -> str | None:
    """The workload kind the deployment runs as: its status, else its live workloads."""
    kind = (body.get("status") or {}).get("workloadKind")
    if kind in WORKLOAD_KINDS:
        return str(kind)
    live = {k for k, _ in observed.objects if k in WORKLOAD_KINDS}
    return live.pop() if len(live) == 1 else None


def _manifest(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "generation", "labels", "annotations")
            if k in meta
        },
        "spec": body.get("spec"),
    }


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def notices(previous: dict[str, Any], status: dict[str, Any]) -> list[Notice]:
    """Events for what newly went wrong (each once, not on every pass)."""
    out = []
    validated, before = _condition(status, "Validated"), _condition(previous, "Validated")
    if validated.get("message") != before.get("message"):
        if validated.get("status") == "False":
            out.append(Notice("Warning", "InvalidSpec", validated["message"]))
        elif validated.get("reason") == VALID_WITH_WARNINGS:
            out.append(Notice("Warning", "SpecWarnings", validated["message"]))
    workload = _condition(status, "WorkloadAvailable")
    if (
        workload.get("status") == "False"
        and _condition(previous, "WorkloadAvailable").get("status") != "False"
    ):
        out.append(Notice("Warning", "WorkloadUnavailable", workload["message"]))
    return out


def status_changed(previous: dict[str, Any], status: dict[str, Any]) -> bool:
    """Whether writing `status` would change anything (merge patch: only its keys count)."""
    return any(previous.get(k) != v for k, v in status.items())


async def reconcile(
    body: dict[str, Any],
    client: KubeClient,
    cluster: ClusterInfo,
    observed: Observed,
    cache: DesiredCache | None = None,
) -> Outcome:
    """Bring the children of one ModelDeployment in line with its spec. `observed` holds its
    children as the watches last reported them; `cluster` what the API server offers."""
    meta = body["metadata"]
    namespace, generation = meta.get("namespace", "default"), meta.get("generation")
    previous = body.get("status") or {}
    cluster = ClusterInfo(
        lws_available=cluster.lws_available,
        image_registry=cluster.image_registry,
        recorded_workload=recorded_workload(body, observed),
    )
    try:
        plan, desired = (cache or DesiredCache(size=1)).get(_manifest(body), cluster)
    except PlanError as exc:
        status = invalid_status(exc.problems, generation, previous)
        return Outcome(status, valid=False, problems=str(exc), notices=notices(previous, status))
    rollout = plan_rollout(plan, desired, observed)
    unavailable = plan.workload_kind == "LeaderWorkerSet" and not cluster.lws_available
    outcome = Outcome(status={})

    async def apply(obj: dict[str, Any]) -> None:
        key = (obj["kind"], obj["metadata"]["name"])
        live = observed.get(*key)
        result = await client.apply(obj, exists=live is not None)
        outcome.applied += 1
        if result:
            result.setdefault("kind", obj["kind"])
            version = result.get("metadata", {}).get("resourceVersion")
            if version:
                outcome.written[key] = version
            observed.objects[key] = {
                **result,
                "status": (live or {}).get("status", result.get("status")),
            }

    changed = [
        o
        for o in rollout.objects
        if not (unavailable and o["kind"] == "LeaderWorkerSet")  # not served: report it
        and not up_to_date(o, observed.get(o["kind"], o["metadata"]["name"]))
    ]
    try:
        for wave in (
            [o for o in changed if o["kind"] in REFERENCED_KINDS],
            [o for o in changed if o["kind"] not in REFERENCED_KINDS],
        ):
            results = await asyncio.gather(*map(apply, wave), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
        stale = [] if unavailable else [k for k in observed.objects if k not in wanted]
        for key in stale:
            if await client.delete(key[0], namespace, key[1]):
                outcome.deleted += 1
            del observed.objects[key]
    except KubeError as exc:
        outcome.error = exc
    outcome.status = aggregate(
        plan,
        rollout,
        observed,
        generation,
        previous,
        apply_error=str(outcome.error) if outcome.error else None,
        lws_available=cluster.lws_available,
    )
    outcome.notices = notices(previous, outcome.status)
    return outcome
