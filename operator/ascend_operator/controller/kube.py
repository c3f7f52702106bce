"""A small async Kubernetes client for the reconcile layer: server-side apply, list by
labels, delete, status patches. It uses the credentials kopf resolved at login, so the
operator authenticates once, the same way for its watches and its writes."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import tempfile
from typing import Any

import httpx

from ..kinds import BY_KIND as RESOURCES

FIELD_MANAGER = "ascend-serve"


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status (0 for a transport error)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message

    @property
    def retriable(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500


class KubeClient:
    """Async calls against one API server."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        verify: ssl.SSLContext | bool = True,
        cert: tuple[str, str] | None = None,
    ):
        from .. import __version__

        self.http = httpx.AsyncClient(
            base_url=base_url,
            headers={"User-Agent": f"ascend-serve-operator/{__version__}", **(headers or {})},
            verify=verify,
            cert=cert,
            timeout=httpx.Timeout(30.0),
        )

    @classmethod
    def from_connection(cls, info: Any) -> KubeClient:
        """From kopf's ConnectionInfo (token, client certificates, CA)."""
        headers: dict[str, str] = {}
        if info.token:
            headers["Authorization"] = f"Bearer {info.token}"
        elif info.username and info.password:
            raw = f"{info.username}:{info.password}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(raw).decode()}"
        verify: ssl.SSLContext | bool = True
        if info.insecure:
            verify = False
        elif info.ca_path or info.ca_data:
            verify = ssl.create_default_context(
                cafile=info.ca_path,
                cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data,
            )
        cert = None
        if info.certificate_path and info.private_key_path:
            cert = (info.certificate_path, info.private_key_path)
        elif info.certificate_data and info.private_key_data:
            cert = (_temp_file(info.certificate_data), _temp_file(info.private_key_data))
        return cls(info.server, headers=headers, verify=verify, cert=cert)

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        for attempt in range(4):
            try:
                response = await self.http.request(method, path, **kw)
            except httpx.HTTPError as exc:
                error = KubeError(0, repr(exc))
            else:
                if response.status_code < 300:
                    return response.json() if response.content else {}
                error = KubeError(response.status_code, _message(response))
                if response.status_code not in (429, 500, 502, 503, 504):
                    raise error
            if attempt == 3:
                raise error
            await asyncio.sleep(0.2 * 2**attempt)  # 429/5xx/transport: back off and retry
        raise AssertionError("unreachable")

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", RESOURCES[kind].path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def apply(self, obj: dict[str, Any], exists: bool = True) -> dict[str, Any]:
        """Server-side apply as field manager `ascend-serve` (forcing ownership of our
        fields). An object believed new is created in one request; if it exists after all,
        or a server does not create on apply, the other call follows."""
        meta = obj["metadata"]
        resource = RESOURCES[obj["kind"]]
        path = resource.path(meta.get("namespace"), meta["name"])

        async def ssa() -> dict[str, Any]:
            return await self._call(
                "PATCH",
                path,
                params={"fieldManager": FIELD_MANAGER, "force": "true"},
                content=json.dumps(obj),
                headers={"Content-Type": "application/apply-patch+yaml"},
            )

        async def create() -> dict[str, Any]:
            return await self._call(
                "POST",
                resource.path(meta.get("namespace")),
                json=obj,
                params={"fieldManager": FIELD_MANAGER},
            )

        first, second = (ssa, create) if exists else (create, ssa)
        try:
            return await first()
        except KubeError as exc:
            # 404: it is not there (create it); 409: it is there already (apply onto it)
            if exc.status not in (404, 409):
                raise
        return await second()

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        try:
            await self._call(
                "DELETE",
                RESOURCES[kind].path(namespace, name),
                json={"propagationPolicy": "Background"},
            )
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._call(
            "PATCH",
            RESOURCES[kind].path(namespace, name) + "/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        await self._call("POST", f"/api/v1/namespaces/{namespace}/events", json=event)


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message") or response.text[:300])
    except ValueError:
        return response.text[:300]


def _temp_file(data: bytes | str) -> str:
    with tempfile.NamedTemporaryFile(delete=False, prefix="ascend-serve-", suffix=".pem") as fh:
        fh.write(data if isinstance(data, bytes) else data.encode())
        return fh.name
