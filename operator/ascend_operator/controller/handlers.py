"""kopf handlers: each small and named for its event; the work is in reconcile.py.

- create / update / resume of a ModelDeployment: reconcile now.
- any event on a child carrying our labels (deleted, edited, status changed): reconcile the
  parent after a short debounce, so a burst of pod-readiness changes is one pass, not many.
- a background resync over every known ModelDeployment, so status converges even if an
  event was missed.

There is no delete handler (and so no finalizer): children carry owner references and the
garbage collector removes them, even while the operator is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from ..api.resource import GROUP, PLURAL, VERSION
from ..images import DEFAULT_REGISTRY
from ..render import labels as lbl
from . import metrics
from .kube import KubeClient, KubeError
from .reconcile import ChildCache, LwsDetector, event, reconcile

log = logging.getLogger("ascend_operator")

DEBOUNCE_SECONDS = 1.0
RESYNC_SECONDS = 60.0


@dataclass
class OperatorState:
    """Shared by all handlers (kopf's memo)."""

    image_registry: str = DEFAULT_REGISTRY
    client: KubeClient | None = None
    lws: LwsDetector = field(default_factory=LwsDetector)
    cache: ChildCache = field(default_factory=ChildCache)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    pending: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)
    last_invalid: dict[tuple[str, str], str] = field(default_factory=dict)
    known: set[tuple[str, str]] = field(default_factory=set)
    bodies: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """Latest ModelDeployment bodies from the watch (no GET before a debounced pass)."""
    resync: asyncio.Task[None] | None = None

    def lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())


STATE = OperatorState()


async def run_pass(body: dict[str, Any], state: OperatorState, trigger: str) -> None:
    """Reconcile one ModelDeployment and write its status; raises on retriable API errors."""
    meta = body["metadata"]
    key = (meta.get("namespace", "default"), meta["name"])
    assert state.client is not None
    async with state.lock(key):
        started = time.perf_counter()
        try:
            outcome = await reconcile(
                body, state.client, state.lws, state.image_registry, state.cache
            )
        except KubeError as exc:
            metrics.RECONCILES.labels("error").inc()
            metrics.ERRORS.labels(str(exc.status)).inc()
            raise kopf.TemporaryError(f"API error during reconcile: {exc}", delay=2) from exc
        finally:
            metrics.DURATION.observe(time.perf_counter() - started)
        metrics.WRITES.labels("apply").inc(outcome.applied)
        metrics.WRITES.labels("delete").inc(outcome.deleted)
        if not outcome.valid:
            if state.last_invalid.get(key) != outcome.problems:
                state.last_invalid[key] = outcome.problems
                with contextlib.suppress(KubeError):
                    await state.client.create_event(
                        key[0], event(body, "InvalidSpec", outcome.problems)
                    )
            log.warning("%s/%s is invalid:\n%s", key[0], key[1], outcome.problems)
        else:
            state.last_invalid.pop(key, None)
        await state.client.patch_status("ModelDeployment", key[0], key[1], outcome.status)
        result = "invalid" if not outcome.valid else ("error" if outcome.error else "ok")
        metrics.RECONCILES.labels(result).inc()
        log.info(
            "reconciled %s/%s (%s): phase %s, %d applied, %d deleted",
            key[0],
            key[1],
            trigger,
            outcome.status.get("phase"),
            outcome.applied,
            outcome.deleted,
        )
        if outcome.error is not None:
            raise kopf.TemporaryError(f"applying children failed: {outcome.error}", delay=2)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="ascendserve.dev"
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="ascendserve.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30]
    STATE.resync = asyncio.create_task(_resync_loop(STATE), name="resync")


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else kubeconfig; our client shares the credentials."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        if STATE.client is not None:
            await STATE.client.close()
        STATE.client = KubeClient.from_connection(info)
    return info


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    for task in [*STATE.pending.values(), *([STATE.resync] if STATE.resync else [])]:
        task.cancel()
    if STATE.client is not None:
        await STATE.client.close()
        STATE.client = None


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def on_model_deployment(body: kopf.Body, reason: str, **_: Any) -> None:
    await run_pass(dict(body), STATE, str(reason))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def track(event: kopf.RawEvent, **_: Any) -> None:
    """Remember which ModelDeployments exist, for the periodic resync."""
    meta = (event.get("object") or {}).get("metadata") or {}
    key = (meta.get("namespace", "default"), meta.get("name"))
    if event.get("type") == "DELETED":
        STATE.known.discard(key)
        STATE.bodies.pop(key, None)
        STATE.cache.forget(*key)
    elif key[1]:
        STATE.known.add(key)
        STATE.bodies[key] = dict(event.get("object") or {})


async def _resync_loop(state: OperatorState) -> None:
    """A slow full pass over every known ModelDeployment, so status converges even when an
    event was missed. (Not a kopf timer: timers add a finalizer, and a finalizer would block
    deletion while the operator is down.)"""
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        for namespace, name in sorted(state.known):
            poke(namespace, name, state)


async def _debounced(namespace: str, name: str, state: OperatorState) -> None:
    await asyncio.sleep(DEBOUNCE_SECONDS)
    state.pending.pop((namespace, name), None)
    assert state.client is not None
    for attempt in range(5):
        try:
            body = state.bodies.get((namespace, name))
            if attempt or body is None:  # after a failure, read the object afresh
                body = await state.client.get("ModelDeployment", namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            await run_pass(body, state, "child changed")
            return
        except (kopf.TemporaryError, KubeError) as exc:
            log.warning(
                "reconcile of %s/%s after a child change failed (%s); retrying",
                namespace,
                name,
                exc,
            )
            await asyncio.sleep(min(2**attempt, 10))


def poke(namespace: str, name: str, state: OperatorState = STATE) -> None:
    """Schedule a reconcile of a parent; events within the debounce window coalesce."""
    key = (namespace, name)
    if key not in state.pending:
        state.pending[key] = asyncio.create_task(_debounced(namespace, name, state))


def _child_handler(group: str, version: str, plural: str, kind: str) -> None:
    resource = f"{plural}.{version}.{group}" if group else f"{plural}.{version}"

    @kopf.on.event(
        resource,
        labels={lbl.DEPLOYMENT_LABEL: kopf.PRESENT, "app.kubernetes.io/managed-by": lbl.MANAGED_BY},
    )
    async def on_child_event(event: kopf.RawEvent, **_: Any) -> None:
        key = STATE.cache.update(str(event.get("type")), dict(event.get("object") or {}), kind)
        if key is not None and key in STATE.known:
            poke(*key)

    on_child_event.__name__ = f"on_{plural}_event"


for _group_version, _plural, _kind in (
    ("v1", "configmaps", "ConfigMap"),
    ("v1", "services", "Service"),
    ("v1", "serviceaccounts", "ServiceAccount"),
    ("apps/v1", "deployments", "Deployment"),
    ("apps/v1", "statefulsets", "StatefulSet"),
    ("leaderworkerset.x-k8s.io/v1", "leaderworkersets", "LeaderWorkerSet"),
    ("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io/v1", "roles", "Role"),
    ("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding"),
):
    _group, _, _version = _group_version.rpartition("/")
    _child_handler(_group, _version, _plural, _kind)
