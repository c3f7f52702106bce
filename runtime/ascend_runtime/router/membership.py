"""Where the router learns its instances: a static list, a JSON file (re-read when it
changes), or the EndpointSlices of each role's Kubernetes Service (watched)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import ssl
from typing import Any

import httpx

from ..config import RouterBackends
from .pool import Pool

log = logging.getLogger("ascend_runtime.router")

SA_DIR = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Membership:
    """Keeps the pool's members in step with the configured source."""

    def __init__(self, backends: RouterBackends, pool: Pool):
        self.backends, self.pool = backends, pool
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        source = self.backends.source
        if source == "static":
            for role, urls in self.backends.static.items():
                self.pool.set_members(role, urls)
        elif source == "file":
            self._read_file()
            self._tasks.append(asyncio.create_task(self._watch_file(), name="members-file"))
        else:
            api = KubernetesApi.from_environment()
            namespace = self.backends.namespace or api.namespace
            for role, service in self.backends.services.items():
                self._tasks.append(
                    asyncio.create_task(
                        self._watch_slices(api, namespace, role, service), name=f"slices-{role}"
                    )
                )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ file

    def _read_file(self) -> None:
        assert self.backends.file
        try:
            data = json.loads(pathlib.Path(self.backends.file).read_text())
        except (OSError, ValueError) as exc:
            log.error("cannot read members file %s: %s", self.backends.file, exc)
            return
        for role, urls in data.items():
            self.pool.set_members(role, urls)

    async def _watch_file(self) -> None:
        assert self.backends.file
        path = pathlib.Path(self.backends.file)
        last = None
        while True:
            with contextlib.suppress(OSError):
                mtime = path.stat().st_mtime_ns
                if mtime != last:
                    last = mtime
                    self._read_file()
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ kubernetes

    async def _watch_slices(
        self, api: KubernetesApi, namespace: str, role: str, service: str
    ) -> None:
        slices: dict[str, list[str]] = {}
        port = self.backends.engine_port
        path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        selector = {"labelSelector": f"kubernetes.io/service-name={service}"}
        while True:
            try:
                listing = await api.get(path, selector)
                slices = {
                    s["metadata"]["name"]: ready_urls(s, port)
                    for s in listing.get("items", [])
                    if _owned_by(s, service)
                }
                self._apply(role, slices)
                version = listing.get("metadata", {}).get("resourceVersion", "")
                params = {
                    **selector,
                    "watch": "true",
                    "resourceVersion": version,
                    "allowWatchBookmarks": "true",
                }
                async for event in api.watch(path, params):
                    kind, obj = event.get("type"), event.get("object", {})
                    name = obj.get("metadata", {}).get("name")
                    if name and not _owned_by(obj, service):
                        continue
                    if kind in ("ADDED", "MODIFIED") and name:
                        slices[name] = ready_urls(obj, port)
                    elif kind == "DELETED" and name:
                        slices.pop(name, None)
                    elif kind == "ERROR":
                        break  # e.g. 410 Gone: list again
                    self._apply(role, slices)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep watching through API server hiccups
                log.warning(
                    "watching EndpointSlices of %s/%s failed: %r; retrying", namespace, service, exc
                )
            await asyncio.sleep(1.0)

    def _apply(self, role: str, slices: dict[str, list[str]]) -> None:
        self.pool.set_members(role, sorted({u for urls in slices.values() for u in urls}))


def _owned_by(endpoint_slice: dict[str, Any], service: str) -> bool:
    """The label selector again, client side (cheap insurance against a loose server)."""
    labels = endpoint_slice.get("metadata", {}).get("labels") or {}
    return labels.get("kubernetes.io/service-name") == service


def ready_urls(endpoint_slice: dict[str, Any], default_port: int) -> list[str]:
    """Base URLs of the ready endpoints of one EndpointSlice."""
    ports = [p.get("port") for p in endpoint_slice.get("ports") or [] if p.get("port")]
    port = ports[0] if ports else default_port
    urls = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        for address in endpoint.get("addresses") or []:
            host = f"[{address}]" if ":" in address else address
            urls.append(f"http://{host}:{port}")
    return urls


class KubernetesApi:
    """Just enough of a Kubernetes client: GET and watch, in-cluster credentials."""

    def __init__(
        self, base_url: str, token: str | None, verify: ssl.SSLContext | bool, namespace: str
    ):
        self.namespace = namespace
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            verify=verify,
            timeout=httpx.Timeout(10.0, read=None),
        )

    @classmethod
    def from_environment(cls) -> KubernetesApi:
        """In-cluster service account, or ASCEND_SERVE_KUBE_API (tests, local runs)."""
        namespace = os.environ.get("POD_NAMESPACE", "default")
        override = os.environ.get("ASCEND_SERVE_KUBE_API")
        if override:
            return cls(override, os.environ.get("ASCEND_SERVE_KUBE_TOKEN"), False, namespace)
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError(
                "not in a cluster (KUBERNETES_SERVICE_HOST unset) and "
                "ASCEND_SERVE_KUBE_API not set: use backends.source static or "
                "file outside Kubernetes"
            )
        token = (SA_DIR / "token").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        with contextlib.suppress(OSError):
            namespace = (SA_DIR / "namespace").read_text().strip()
        return cls(f"https://{host}:{port}", token, ctx, namespace)

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        response = await self.client.get(path, params=params)
        response.raise_for_status()
        return response.json()

    async def watch(self, path: str, params: dict[str, str]):  # type: ignore[no-untyped-def]
        async with self.client.stream("GET", path, params=params) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.strip():
                    yield json.loads(line)
