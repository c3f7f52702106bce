"""A small synchronous client of the envtest control plane for tests: CRUD by kind, server-side
apply, status patches, and playing the kubelet (pods Ready with an IP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import yaml

from ascend_operator.kinds import BY_KIND, Kind
from ascend_operator.render.labels import DEPLOYMENT_LABEL
from envtest import ControlPlane, eventually
from helpers import ROOT

KINDS: dict[str, Kind] = {
    **BY_KIND,
    "Namespace": Kind("v1", "Namespace", "namespaces", namespaced=False),
    "Pod": Kind("v1", "Pod", "pods"),
    "ReplicaSet": Kind("apps/v1", "ReplicaSet", "replicasets"),
    "ClusterRole": Kind("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", False),
    "ClusterRoleBinding": Kind(
        "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", False
    ),
    "Secret": Kind("v1", "Secret", "secrets"),
    "ControllerRevision": Kind("apps/v1", "ControllerRevision", "controllerrevisions"),
}
FIELD_MANAGER = "envtest"


class ApiError(Exception):
    def __init__(self, response: httpx.Response):
        self.status = response.status_code
        try:
            self.body = response.json()
        except ValueError:
            self.body = {"message": response.text}
        super().__init__(f"{self.status}: {self.body.get('message')}")


class Kube:
    """Calls as cluster admin (or with a bearer token)."""

    def __init__(self, plane: ControlPlane, token: str | None = None):
        self.plane = plane
        self.http = plane.http(token)

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *_: Any) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        response = self.http.request(method, path, **kw)
        if response.status_code >= 300:
            raise ApiError(response)
        return response.json() if response.content else {}

    @staticmethod
    def path(kind: str, namespace: str | None, name: str | None = None) -> str:
        return KINDS[kind].path(namespace, name)

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", self.path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None, **params: str) -> list[dict[str, Any]]:
        return self._call("GET", self.path(kind, namespace), params=params).get("items", [])

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        ns = namespace or obj["metadata"].get("namespace")
        return self._call("POST", self.path(obj["kind"], ns), json=obj)

    def merge(
        self, kind: str, namespace: str | None, name: str, patch: dict[str, Any], sub: str = ""
    ) -> dict[str, Any]:
        path = self.path(kind, namespace, name) + (f"/{sub}" if sub else "")
        return self._call(
            "PATCH",
            path,
            content=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    def apply(
        self,
        obj: dict[str, Any],
        namespace: str | None = None,
        *,
        dry_run: bool = False,
        manager: str = FIELD_MANAGER,
        force: bool = False,
    ) -> dict[str, Any]:
        ns = namespace or obj["metadata"].get("namespace")
        params = {"fieldManager": manager}
        if force:
            params["force"] = "true"
        if dry_run:
            params["dryRun"] = "All"
        return self._call(
            "PATCH",
            self.path(obj["kind"], ns, obj["metadata"]["name"]),
            params=params,
            content=json.dumps(obj),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        try:
            self._call(
                "DELETE",
                self.path(kind, namespace, name),
                json={"propagationPolicy": "Background"},
            )
        except ApiError as exc:
            if exc.status != 404:
                raise

    # ------------------------------------------------------------------ helpers

    def create_namespace(self, name: str) -> None:
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def install_crds(self, folder: Path = ROOT / "crds") -> list[str]:
        """Server-side apply every CRD in `folder` (or one file); wait until each is
        Established."""
        names = []
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else [folder]:
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    self.apply(doc, force=True)
                    names.append(doc["metadata"]["name"])
        for name in names:
            eventually(lambda n=name: self.established(n), 30, f"CRD {name} Established")
        return names

    def established(self, crd: str) -> bool:
        obj = self.get("CustomResourceDefinition", None, crd) or {}
        conditions = (obj.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def owned(self, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every object of a child kind in the namespace that a ModelDeployment owns or that
        carries our deployment label, by (kind, name)."""
        from ascend_operator.kinds import CHILDREN

        out = {}
        for kind in CHILDREN:
            try:
                items = self.list(kind.kind, namespace)
            except ApiError as exc:
                if exc.status == 404 and kind.kind == "LeaderWorkerSet":
                    continue  # the LWS CRD is not installed
                raise
            for obj in items:
                meta = obj["metadata"]
                name = meta["name"]
                ours = DEPLOYMENT_LABEL in (meta.get("labels") or {}) or any(
                    ref.get("kind") == "ModelDeployment"
                    for ref in meta.get("ownerReferences") or []
                )
                if not ours:
                    continue
                out[(kind.kind, name)] = {
                    "apiVersion": kind.api_version,
                    "kind": kind.kind,
                    **obj,
                }
        return out

    def play_kubelet(self, namespace: str, selector: str, ip_base: str = "10.244.0.") -> int:
        """Mark every pod matching `selector` Running and Ready with an IP, as a kubelet
        would; returns how many were patched."""
        pods = self.list("Pod", namespace, labelSelector=selector)
        for i, pod in enumerate(pods):
            self.mark_pod(namespace, pod, ready=True, ip=f"{ip_base}{10 + i}")
        return len(pods)

    def mark_pod(self, namespace: str, pod: dict[str, Any], *, ready: bool, ip: str) -> None:
        now = "2026-01-01T00:00:00Z"
        status = "True" if ready else "False"
        containers = [c["name"] for c in pod["spec"]["containers"]]
        self.merge(
            "Pod",
            namespace,
            pod["metadata"]["name"],
            {
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "hostIP": "192.168.0.1",
                    "startTime": now,
                    "conditions": [
                        {"type": t, "status": s, "lastTransitionTime": now}
                        for t, s in (
                            ("PodScheduled", "True"),
                            ("Initialized", "True"),
                            ("ContainersReady", status),
                            ("Ready", status),
                        )
                    ],
                    "containerStatuses": [
                        {
                            "name": c,
                            "ready": ready,
                            "restartCount": 0,
                            "image": "sim",
                            "imageID": "sim",
                            "started": True,
                            "state": {"running": {"startedAt": now}},
                        }
                        for c in containers
                    ],
                }
            },
            sub="status",
        )
