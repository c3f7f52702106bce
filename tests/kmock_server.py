"""KMock's stateful Kubernetes API emulator served on loopback from a background thread, for
tests that drive real clients (kubectl now, the kopf operator later) against it."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import kmock
from kmock._internal.references import ResourceInfo

ALL_VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}

RESOURCES: dict[str, tuple[str, bool, set[str]]] = {
    # "group/version/plural": (kind, namespaced, subresources)
    "v1/namespaces": ("Namespace", False, set()),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/services": ("Service", True, set()),
    "v1/serviceaccounts": ("ServiceAccount", True, set()),
    "v1/events": ("Event", True, set()),
    "apps/v1/deployments": ("Deployment", True, {"status", "scale"}),
    "apps/v1/statefulsets": ("StatefulSet", True, {"status", "scale"}),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, {"status"}),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, set()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": (
        "CustomResourceDefinition",
        False,
        {"status"},
    ),
    "leaderworkerset.x-k8s.io/v1/leaderworkersets": ("LeaderWorkerSet", True, {"status", "scale"}),
    "ascendserve.dev/v1alpha1/modeldeployments": ("ModelDeployment", True, {"status", "scale"}),
}


class _Emulator(kmock.KubernetesEmulator):
    """KMock 0.8 answers /api/v1 with groupVersion "/v1"; kubectl then maps no core kind.
    Serve "v1" as a real API server does (test-only shim over a private method; KMock is
    pinned, so a change upstream shows up as a failing test, not a silent skip)."""

    async def _serve_version(self, request: Any) -> Any:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload = {**payload, "groupVersion": payload["groupVersion"][1:]}
        return payload

    # KMock checks every request against its whole request log (identity scans of each
    # reaction's view), so its per-request cost grows with history. Tests keep the log (they
    # assert on recorded calls); the scale benchmark bounds it, as a real API server keeps none.
    # Requests still being served (watches, and any awaiting the store's lock) stay in the log,
    # since KMock looks each one up there before answering it.
    history: int | None = None
    _in_flight: set[int] | None = None

    async def _handle(self, request: Any) -> Any:
        if self.history is None:
            return await super()._handle(request)
        if self._in_flight is None:
            self._in_flight = set()
        self._in_flight.add(id(request))
        if len(self._requests) > 2 * self.history:
            keep = len(self._requests) - self.history
            self._requests[:] = [
                r for i, r in enumerate(self._requests) if i >= keep or id(r) in self._in_flight
            ]
        try:
            return await super()._handle(request)
        finally:
            self._in_flight.discard(id(request))


def _declare(emulator: Any, resources: dict[str, tuple[str, bool, set[str]]]) -> None:
    for key, (kind, namespaced, subresources) in resources.items():
        emulator.resources[key] = ResourceInfo(
            kind=kind, namespaced=namespaced, subresources=subresources, verbs=ALL_VERBS
        )


@contextlib.contextmanager
def kmock_api(
    resources: dict[str, tuple[str, bool, set[str]]] | None = None,
    history: int | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield (base URL, emulator) of a running KMock Kubernetes API; stop it on exit.

    ``history`` bounds the request log to about that many recent requests (None keeps all)."""
    started = threading.Event()
    state: dict[str, Any] = {}
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        async with _Emulator() as emulator, kmock.Server(emulator) as server:
            _declare(emulator, resources or RESOURCES)
            emulator.history = history
            state["url"], state["emulator"] = str(server.url), emulator
            state["stop"] = asyncio.Event()
            started.set()
            await state["stop"].wait()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # surface start-up failures to the test
            state["error"] = exc
            started.set()

    thread = threading.Thread(target=run, daemon=True, name="kmock")
    thread.start()
    if not started.wait(30) or "error" in state:
        raise RuntimeError(f"KMock did not start: {state.get('error')}")
    try:
        yield state["url"], state["emulator"]
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def write_kubeconfig(path: pathlib.Path, url: str) -> pathlib.Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: test, user: {token: test}}]\n"
        "contexts: [{name: kmock, context: {cluster: kmock, user: test, namespace: default}}]\n"
        "current-context: kmock\n"
    )
    return path
