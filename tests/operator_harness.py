"""The real operator (`ascend-serve operator`, a subprocess) against KMock's API server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from kmock_server import RESOURCES, kmock_api, write_kubeconfig

MD_PATH = "/apis/ascendserve.dev/v1alpha1/namespaces/{ns}/modeldeployments"
LWS_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "leaderworkersets.leaderworkerset.x-k8s.io"},
    "spec": {"group": "leaderworkerset.x-k8s.io"},
}

PATHS = {
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "StatefulSet": "/apis/apps/v1/namespaces/{ns}/statefulsets",
    "LeaderWorkerSet": "/apis/leaderworkerset.x-k8s.io/v1/namespaces/{ns}/leaderworkersets",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "Event": "/api/v1/namespaces/{ns}/events",
}


class Cluster:
    """Helpers over the KMock API the operator talks to."""

    def __init__(self, url: str, emulator: Any):
        self.url, self.emulator = url, emulator
        self.http = httpx.Client(base_url=url, timeout=10)

    def create_md(self, manifest: dict[str, Any]) -> dict[str, Any]:
        ns = manifest["metadata"].get("namespace", "default")
        # KMock assigns no resourceVersion, and kopf's patches test for one: give it one.
        manifest = {
            **manifest,
            "metadata": {
                **manifest["metadata"],
                "namespace": ns,
                "generation": 1,
                "resourceVersion": "1",
                "uid": f"uid-{manifest['metadata']['name']}",
            },
        }
        r = self.http.post(MD_PATH.format(ns=ns), json=manifest)
        r.raise_for_status()
        return r.json()

    def md(self, ns: str, name: str) -> dict[str, Any] | None:
        r = self.http.get(f"{MD_PATH.format(ns=ns)}/{name}")
        return r.json() if r.status_code == 200 else None

    def patch_md(self, ns: str, name: str, patch: dict[str, Any]) -> None:
        current = self.md(ns, name) or {}
        generation = int(current.get("metadata", {}).get("generation") or 1) + 1
        body = {**patch, "metadata": {**patch.get("metadata", {}), "generation": generation}}
        r = self.http.patch(
            f"{MD_PATH.format(ns=ns)}/{name}",
            json=body,
            headers={"content-type": "application/merge-patch+json"},
        )
        r.raise_for_status()

    def delete_md(self, ns: str, name: str) -> None:
        self.http.delete(f"{MD_PATH.format(ns=ns)}/{name}").raise_for_status()

    def objects(self, kind: str, ns: str, deployment: str | None = None) -> list[dict]:
        items = self.http.get(PATHS[kind].format(ns=ns)).json().get("items", [])
        if deployment:
            items = [
                o
                for o in items
                if (o["metadata"].get("labels") or {}).get("ascendserve.dev/deployment")
                == deployment
            ]
        return items

    def children(self, ns: str, deployment: str) -> dict[tuple[str, str], dict]:
        return {
            (k, o["metadata"]["name"]): o
            for k in PATHS
            if k != "Event"
            for o in self.objects(k, ns, deployment)
        }

    def delete(self, kind: str, ns: str, name: str) -> None:
        self.http.delete(f"{PATHS[kind].format(ns=ns)}/{name}").raise_for_status()

    def patch(self, kind: str, ns: str, name: str, patch: dict[str, Any]) -> None:
        self.http.patch(
            f"{PATHS[kind].format(ns=ns)}/{name}",
            json=patch,
            headers={"content-type": "application/merge-patch+json"},
        ).raise_for_status()

    def set_status(self, kind: str, ns: str, name: str, status: dict[str, Any]) -> None:
        self.http.patch(
            f"{PATHS[kind].format(ns=ns)}/{name}/status",
            json={"status": status},
            headers={"content-type": "application/merge-patch+json"},
        ).raise_for_status()

    def install_lws_crd(self) -> None:
        self.http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=LWS_CRD)


def eventually(check: Callable[[], Any], timeout: float = 20.0, message: str = "") -> Any:
    """Poll until `check` returns something truthy (and return it) or fail."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out: {message or check}; last value {last!r}")


class OperatorProcess:
    """`ascend-serve operator` as a subprocess (standalone, DEBUG logs) with a kubeconfig;
    `scope` are its namespace flags."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        *extra: str,
        scope: tuple[str, ...] = ("--all-namespaces",),
    ):
        self.kubeconfig, self.log, self.extra, self.scope = kubeconfig, log, extra, scope
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ascend_operator.cli",
                    "operator",
                    *self.scope,
                    "--standalone",
                    "--log-level",
                    "DEBUG",
                    *self.extra,
                ],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running_operator(
    tmp_path: Path, *, lws: bool = False
) -> Iterator[tuple[Cluster, OperatorProcess]]:
    with kmock_api(RESOURCES) as (url, emulator):
        cluster = Cluster(url, emulator)
        cluster.http.post(
            "/api/v1/namespaces",
            json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "llm"}},
        )
        if lws:
            cluster.install_lws_crd()
        operator = OperatorProcess(
            write_kubeconfig(tmp_path / "kubeconfig", url), tmp_path / "operator.log"
        )
        operator.start()
        try:
            yield cluster, operator
        finally:
            operator.stop()
