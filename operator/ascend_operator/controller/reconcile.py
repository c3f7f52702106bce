"""One reconcile pass of a ModelDeployment: plan, render, apply what differs, prune what the
plan no longer has, and compute the status. An invalid spec touches no child."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..planner import ClusterInfo, PlanError, plan_manifest
from ..render import labels as lbl
from ..render import render
from . import rollout
from .kube import KubeClient, KubeError
from .status import Observed, aggregate, invalid_status, now_iso

log = logging.getLogger("ascend_operator.reconcile")

DESIRED_HASH = "ascendserve.dev/desired-hash"
LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"


@dataclass
class Outcome:
    """What one pass did."""

    status: dict[str, Any]
    applied: int = 0
    deleted: int = 0
    valid: bool = True
    error: KubeError | None = None
    problems: str = ""


@dataclass
class LwsDetector:
    """Whether the LeaderWorkerSet CRD is installed, re-checked at most once a minute."""

    ttl: float = 60.0
    _value: bool | None = None
    _checked: float = field(default=0.0)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def available(self, client: KubeClient) -> bool:
        async with self._lock:  # one lookup for a burst of reconciles
            if self._value is None or time.monotonic() - self._checked > self.ttl:
                found = await client.get("CustomResourceDefinition", None, LWS_CRD)
                self._value, self._checked = found is not None, time.monotonic()
            return self._value


def desired_hash(obj: dict[str, Any]) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stamp(obj: dict[str, Any]) -> dict[str, Any]:
    """The object with the hash of its desired form in an annotation (drift detection)."""
    out = copy.deepcopy(obj)
    out["metadata"].setdefault("annotations", {})[DESIRED_HASH] = desired_hash(obj)
    return out


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


class ChildCache:
    """Children as the watch streams last reported them, by (namespace, deployment), like
    an informer's store: a reconcile reads it instead of listing every kind again."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]] = {}
        self.applied: dict[tuple[str, str, str], str | None] = {}

    def update(self, event_type: str, obj: dict[str, Any], kind: str) -> tuple[str, str] | None:
        """Record an event; returns the parent's key when something changed (a re-listed,
        identical object, as after a watch reconnects, changes nothing)."""
        meta = obj.get("metadata") or {}
        parent = (meta.get("labels") or {}).get(lbl.DEPLOYMENT_LABEL)
        if not parent or not meta.get("name"):
            return None
        key = (meta.get("namespace", "default"), parent)
        children = self._store.setdefault(key, {})
        if event_type == "DELETED":
            return key if children.pop((kind, meta["name"]), None) is not None else None
        new = {**obj, "kind": kind}
        old = children.get((kind, meta["name"]))
        if old == new:
            return None
        applied = self.applied.get((key[0], kind, meta["name"]))
        annotations = meta.get("annotations") or {}
        echo = (
            old is None
            and applied is not None
            and annotations.get(DESIRED_HASH) == applied
            and not obj.get("status")
        )
        children[(kind, meta["name"])] = new
        return None if echo else key  # our own create coming back needs no new pass

    def remember_applied(self, namespace: str, obj: dict[str, Any]) -> None:
        """The desired-hash just applied, so the watch echo of that write is recognised."""
        annotations = obj["metadata"].get("annotations") or {}
        self.applied[(namespace, obj["kind"], obj["metadata"]["name"])] = annotations.get(
            DESIRED_HASH
        )

    def observed(self, namespace: str, name: str, uid: str | None) -> Observed:
        observed = Observed()
        for key, obj in self._store.get((namespace, name), {}).items():
            owners = obj.get("metadata", {}).get("ownerReferences") or []
            if not uid or any(o.get("uid") == uid for o in owners):
                observed.objects[key] = obj
        return observed

    def forget(self, namespace: str, name: str) -> None:
        self._store.pop((namespace, name), None)


async def reconcile(
    body: dict[str, Any],
    client: KubeClient,
    lws: LwsDetector,
    image_registry: str,
    cache: ChildCache,
) -> Outcome:
    """Bring the children of one ModelDeployment in line with its spec (children as the
    watch cache has them)."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta.get("namespace", "default")
    uid, generation = meta.get("uid"), meta.get("generation")
    previous = body.get("status") or {}
    cluster = ClusterInfo(lws_available=await lws.available(client), image_registry=image_registry)
    try:
        plan = plan_manifest(_manifest(body), cluster)
    except PlanError as exc:
        return Outcome(
            invalid_status(exc.problems, generation, previous), valid=False, problems=str(exc)
        )
    desired = [stamp(o) for o in render(plan)]
    observed = cache.observed(namespace, name, uid)
    held = rollout.held_roles(plan, desired, observed)
    outcome = Outcome(status={})
    try:
        for obj in rollout.with_live_templates(desired, observed, held):
            live = observed.get(obj["kind"], obj["metadata"]["name"])
            if up_to_date(obj, live):
                continue
            cache.remember_applied(namespace, obj)
            result = await client.apply(obj, exists=live is not None)
            outcome.applied += 1
            if result:
                result.setdefault("kind", obj["kind"])
                observed.objects[(obj["kind"], obj["metadata"]["name"])] = {
                    **result,
                    "status": (live or {}).get("status", result.get("status")),
                }
        wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
        for key in [k for k in observed.objects if k not in wanted]:
            if await client.delete(key[0], namespace, key[1]):
                outcome.deleted += 1
            del observed.objects[key]
    except KubeError as exc:
        outcome.error = exc
    outcome.status = aggregate(
        plan,
        desired,
        observed,
        generation,
        previous,
        apply_error=str(outcome.error) if outcome.error else None,
        held=held,
    )
    return outcome


def event(
    body: dict[str, Any],
    reason: str,
    message: str,
    type_: str = "Warning",
) -> dict[str, Any]:
    """A core/v1 Event about the ModelDeployment."""
    meta = body["metadata"]
    stamp_ = now_iso()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": "ascend-serve-operator"},
        "firstTimestamp": stamp_,
        "lastTimestamp": stamp_,
        "count": 1,
    }
