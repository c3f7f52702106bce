"""kopf handlers: each small and named for its event; the work is in reconcile.py.

- create / update / resume of a ModelDeployment: reconcile now.
- any change to a child (found by its controller owner reference, so a child stripped of
  our labels is still ours): reconcile the parent after a short debounce, so a burst of
  pod-readiness changes is one pass, not many.
- a slow background resync over every ModelDeployment, so status converges even if an
  event was missed.

kopf keeps the bookkeeping: two indexes (`children`: every owned child by parent;
`deployments`: every ModelDeployment's latest body) are what a pass reads instead of listing,
the operator-wide state lives in kopf's memo, and Events go through kopf's poster.

There is no delete handler (and so no finalizer): children carry owner references and the
garbage collector removes them, even while the operator is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from ..api.resource import GROUP, PLURAL, VERSION
from ..images import DEFAULT_REGISTRY
from ..kinds import CHILDREN, Kind
from ..planner import ClusterInfo
from ..render import labels as lbl
from . import metrics
from .kube import KubeClient, KubeError
from .reconcile import (
    LWS_CRD,
    DesiredCache,
    controller_owner,
    observed_children,
    reconcile,
    status_changed,
)

log = logging.getLogger("ascend_operator")

DEBOUNCE_SECONDS = 1.0
RESYNC_SECONDS = 60.0
Key = tuple[str, str]


@dataclass
class OperatorState:
    """Operator-wide state, carried in kopf's memo (each object's memo is a shallow copy of
    the operator's, so they all share this one object)."""

    image_registry: str = DEFAULT_REGISTRY
    client: KubeClient | None = None
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    pending: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    """Debounced passes not started yet, by parent (events in the window coalesce)."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """Every debounced pass still running or waiting (cancelled at shutdown)."""
    written: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """resourceVersion of the operator's own last write of each child, by (namespace, kind,
    name): the watch event of that write is its echo and needs no pass."""
    children: kopf.Index[Key, dict[str, Any]] | None = None
    deployments: kopf.Index[Key, dict[str, Any]] | None = None
    crds: kopf.Index[str, bool] | None = None
    desired: DesiredCache = field(default_factory=DesiredCache)
    resync: asyncio.Task[None] | None = None

    def lock(self, key: Key) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def remember(self, indexes: dict[str, Any]) -> None:
        """Keep kopf's index views (always the same objects) for passes run outside a
        handler (debounced and resync passes). A view kopf hands over as None (seen while a
        newly installed CRD's watch starts) never replaces one already kept."""
        for name in ("children", "deployments", "crds"):
            view = indexes.get(name)
            if view is not None:
                setattr(self, name, view)

    @property
    def lws_available(self) -> bool:
        """Whether the LeaderWorkerSet CRD is installed (kept current by a CRD watch)."""
        return self.crds is not None and LWS_CRD in self.crds


def _state(memo: Any) -> OperatorState:
    """The shared state; `run_operator` puts it in the operator-wide memo before kopf starts."""
    return memo.state  # type: ignore[no-any-return]


async def run_pass(body: dict[str, Any], state: OperatorState, trigger: str) -> None:
    """Reconcile one ModelDeployment and write its status; raises on retriable API errors."""
    meta = body["metadata"]
    async with state.lock((meta.get("namespace", "default"), meta["name"])):
        await _pass(body, state, trigger)


async def _pass(body: dict[str, Any], state: OperatorState, trigger: str) -> None:
    """One pass, with the ModelDeployment's lock held."""
    meta = body["metadata"]
    key = (meta.get("namespace", "default"), meta["name"])
    if state.client is None or state.children is None:
        # Not an error of the spec: kopf has not handed over its indexes yet. Retry soon
        # (an exception here would wait kopf's default 60 s backoff).
        raise kopf.TemporaryError("the operator's indexes are not ready yet", delay=1)
    started = time.perf_counter()
    try:
        cluster = ClusterInfo(
            lws_available=state.lws_available, image_registry=state.image_registry
        )
        observed = observed_children(state.children.get(key, []), meta.get("uid"))
        outcome = await reconcile(body, state.client, cluster, observed, state.desired)
    except KubeError as exc:
        metrics.RECONCILES.labels("error").inc()
        metrics.ERRORS.labels(str(exc.status)).inc()
        raise kopf.TemporaryError(f"API error during reconcile: {exc}", delay=2) from exc
    finally:
        metrics.DURATION.observe(time.perf_counter() - started)
    state.written.update({(key[0], *k): v for k, v in outcome.written.items()})
    metrics.WRITES.labels("apply").inc(outcome.applied)
    metrics.WRITES.labels("delete").inc(outcome.deleted)
    for notice in outcome.notices:
        kopf.event(body, type=notice.type, reason=notice.reason, message=notice.message)
    if not outcome.valid:
        log.warning("%s/%s is invalid:\n%s", key[0], key[1], outcome.problems)
    terminating = outcome.error is not None and outcome.error.namespace_terminating
    if status_changed(body.get("status") or {}, outcome.status) and not terminating:
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
        if outcome.error.namespace_terminating:
            log.info("%s/%s: its namespace is being deleted; leaving it", key[0], key[1])
            return
        raise kopf.TemporaryError(f"applying children failed: {outcome.error}", delay=2)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="ascendserve.dev"
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="ascendserve.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "ascend-serve-operator"
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30]
    state = _state(memo)
    metrics.LWS_AVAILABLE.set_function(lambda: float(state.lws_available))
    state.resync = asyncio.create_task(_resync_loop(state), name="resync")


@kopf.on.login()
async def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else kubeconfig; our client shares the credentials."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        state = _state(memo)
        if state.client is not None:
            await state.client.close()
        state.client = KubeClient.from_connection(info)
    return info


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    tasks = [*state.tasks, *([state.resync] if state.resync else [])]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if state.client is not None:
        await state.client.close()
        state.client = None


@kopf.index(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    id="crds",
    field="metadata.name",
    value=LWS_CRD,
)
async def index_crd(name: str, **_: Any) -> dict[str, bool]:
    """Whether the LeaderWorkerSet CRD exists, from a watch (no lookup per pass)."""
    return {name: True}


@kopf.index(GROUP, VERSION, PLURAL, id="deployments")
async def index_deployment(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict[Key, Any]:
    """Every ModelDeployment's latest body (debounced passes read it instead of a GET)."""
    return {(namespace, name): dict(body)}


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def on_model_deployment(body: kopf.Body, reason: str, memo: kopf.Memo, **kwargs: Any) -> None:
    state = _state(memo)
    state.remember(kwargs)
    await run_pass(dict(body), state, str(reason))


def _owned(body: kopf.Body, **_: Any) -> bool:
    return controller_owner(body) is not None


def _watch_child(kind: Kind) -> None:
    """Index one child kind by its controlling ModelDeployment, and reconcile on changes."""

    # async: kopf runs a plain function in a thread pool, a hand-off per watch event
    async def index_child(body: kopf.Body, namespace: str, **_: Any) -> dict[Key, Any]:
        owner = controller_owner(body)
        assert owner is not None  # the `when` filter admits owned objects only
        return {(namespace, owner[0]): {**dict(body), "kind": kind.kind}}

    async def on_child_event(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
        state = _state(memo)
        state.remember(kwargs)
        deployments = kwargs["deployments"]
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        written = (meta.get("namespace"), kind.kind, meta.get("name"))
        if event.get("type") == "DELETED":
            state.written.pop(written, None)
        elif state.written.get(written) == meta.get("resourceVersion"):
            return  # our own write coming back
        owner = controller_owner(obj)
        parent = owner[0] if owner else (meta.get("labels") or {}).get(lbl.DEPLOYMENT_LABEL)
        if parent and (meta.get("namespace"), parent) in deployments:
            poke(meta["namespace"], parent, state)

    for fn, name in ((index_child, "index"), (on_child_event, "on_event")):
        fn.__name__ = fn.__qualname__ = f"{name}_{kind.plural}"
    kopf.index(kind.resource, id="children", when=_owned)(index_child)
    # Owned children, and ones that still carry our label after their owner reference was
    # taken off (the pass re-applies it).
    kopf.on.event(kind.resource, id=f"on_{kind.plural}_owned", when=_owned)(on_child_event)
    kopf.on.event(
        kind.resource,
        id=f"on_{kind.plural}_labelled",
        labels={lbl.DEPLOYMENT_LABEL: kopf.PRESENT},
        when=lambda body, **_: controller_owner(body) is None,
    )(on_child_event)


for _kind in CHILDREN:
    _watch_child(_kind)


async def _resync_loop(state: OperatorState) -> None:
    """A slow full pass over every ModelDeployment, so status converges even when an event
    was missed. (Not a kopf timer: timers add a finalizer, and a finalizer would block
    deletion while the operator is down.)"""
    while True:
        await asyncio.sleep(RESYNC_SECONDS)
        for namespace, name in sorted(state.deployments or ()):
            poke(namespace, name, state)


async def _debounced(namespace: str, name: str, state: OperatorState) -> None:
    """A pass after the debounce window. It stays the parent's pending pass until it holds the
    lock, so events while another pass runs join it instead of queueing passes of their own;
    events after it took the lock schedule the next one."""
    key = (namespace, name)
    await asyncio.sleep(DEBOUNCE_SECONDS)
    assert state.client is not None
    for attempt in range(5):
        try:
            async with state.lock(key):
                if state.pending.get(key) is asyncio.current_task():
                    del state.pending[key]
                bodies = list((state.deployments or {}).get(key, []))
                body = bodies[0] if bodies and not attempt else None
                if body is None:  # after a failure, read the object afresh
                    body = await state.client.get("ModelDeployment", namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    return
                await _pass(body, state, "child changed")
            return
        except (kopf.TemporaryError, KubeError) as exc:
            log.warning(
                "reconcile of %s/%s after a child change failed (%s); retrying",
                namespace,
                name,
                exc,
            )
            await asyncio.sleep(min(2**attempt, 10))


def poke(namespace: str, name: str, state: OperatorState) -> None:
    """Schedule a reconcile of a parent; events within the debounce window coalesce."""
    key = (namespace, name)
    if key not in state.pending:
        task = asyncio.create_task(_debounced(namespace, name, state))
        state.pending[key] = task
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
