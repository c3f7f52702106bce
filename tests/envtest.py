"""A real Kubernetes control plane for tests, after controller-runtime's envtest convention.

`KUBEBUILDER_ASSETS` names a folder holding `etcd` and `kube-apiserver` (and optionally
`kube-controller-manager`, which brings garbage collection and the StatefulSet, Deployment and
ServiceAccount controllers). `ControlPlane` starts them on free loopback ports with their own
PKI, RBAC on, and stops every process it started. No scheduler and no kubelet run: pods stay
Pending until a test patches their status as a kubelet would (`play_kubelet`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from procs import die_with_parent, free_port

ASSETS_ENV = "KUBEBUILDER_ASSETS"
SKIP_MESSAGE = (
    "needs a real Kubernetes API server: set KUBEBUILDER_ASSETS to a folder with "
    "kube-apiserver and etcd (`setup-envtest use -p path`, or `../shared/k8s/cluster.sh "
    "assets` in this workspace; CI sets it)"
)
ISSUER = "https://kubernetes.default.svc.cluster.local"
IGNORED_CONFIGMAPS = frozenset({"kube-root-ca.crt", "openshift-service-ca.crt"})
"""ConfigMaps the controller manager puts in every namespace (the second comes from the
OpenShift-flavoured build in ../shared/k8s)."""


def assets_dir() -> Path | None:
    value = os.environ.get(ASSETS_ENV)
    if not value:
        return None
    path = Path(value)
    missing = [b for b in ("etcd", "kube-apiserver") if not (path / b).is_file()]
    if missing:
        raise RuntimeError(f"{ASSETS_ENV}={value} lacks {', '.join(missing)}")
    return path


class _Pki:
    """A throwaway CA and the certificates the control plane needs."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ca_key = self.key("ca")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "envtest-ca")])
        self._ca = self._sign(
            x509.CertificateBuilder().subject_name(name).public_key(self._ca_key.public_key()),
            issuer=name,
            ca=True,
        )
        (folder / "ca.crt").write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))

    def key(self, stem: str) -> rsa.RSAPrivateKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        (self.folder / f"{stem}.key").write_bytes(pem)
        return key

    def _sign(
        self, builder: x509.CertificateBuilder, *, issuer: x509.Name | None = None, ca: bool = False
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (
            builder.issuer_name(issuer or self._ca.subject)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        return builder.sign(self._ca_key, hashes.SHA256())

    def issue(
        self, stem: str, common_name: str, *, org: str | None = None, server: bool = False
    ) -> None:
        key = self.key(stem)
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if org:
            attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .public_key(key.public_key())
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                        x509.DNSName("kubernetes.default.svc"),
                    ]
                ),
                critical=False,
            )
        cert = self._sign(builder)
        (self.folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def path(self, name: str) -> str:
        return str(self.folder / name)


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback."""

    def __init__(self, assets: Path, workdir: Path, *, controller_manager: bool = True):
        self.assets, self.dir = assets, workdir
        self.with_kcm = controller_manager and (assets / "kube-controller-manager").is_file()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.etcd_port = free_port()
        self.api_port = free_port()
        self.url = f"https://127.0.0.1:{self.api_port}"
        self.pki: _Pki | None = None
        self.audit_log = workdir / "logs" / "audit.log"

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.dir / "logs" / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            die_with_parent(argv), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def _apiserver_argv(self) -> list[str]:
        p = self.pki
        assert p is not None
        return [
            str(self.assets / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={p.path('apiserver.crt')}",
            f"--tls-private-key-file={p.path('apiserver.key')}",
            f"--client-ca-file={p.path('ca.crt')}",
            f"--service-account-key-file={p.path('sa.pub')}",
            f"--service-account-signing-key-file={p.path('sa.key')}",
            f"--service-account-issuer={ISSUER}",
            f"--api-audiences={ISSUER}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--profiling=false",
            f"--audit-policy-file={self.dir / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-mode=blocking",
            "--v=1",
        ]

    def start(self) -> ControlPlane:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.pki = _Pki(self.dir / "pki")
        self.pki.issue("apiserver", "kube-apiserver", server=True)
        self.pki.issue("admin", "admin", org="system:masters")
        self.pki.issue("kcm", "system:kube-controller-manager")
        sa_key = self.pki.key("sa")
        (self.dir / "pki" / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        # Every request's metadata (user, verb, resource, response code): tests read who
        # called what and whether it was allowed.
        (self.dir / "audit-policy.yaml").write_text(
            json.dumps(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [{"level": "Metadata"}],
                }
            )
        )
        self.write_kubeconfig(self.dir / "kubeconfig")
        self.write_kubeconfig(self.dir / "kcm.kubeconfig", user="kcm")
        peer = free_port()
        self._spawn(
            "etcd",
            [
                str(self.assets / "etcd"),
                "--name=envtest",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=envtest=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
            ],
        )
        self.start_apiserver()
        if self.with_kcm:
            p = self.pki
            kc = str(self.dir / "kcm.kubeconfig")
            self._spawn(
                "kube-controller-manager",
                [
                    str(self.assets / "kube-controller-manager"),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    "--leader-elect=false",
                    f"--service-account-private-key-file={p.path('sa.key')}",
                    f"--root-ca-file={p.path('ca.crt')}",
                    "--use-service-account-credentials=true",
                    "--controllers=*",
                    "--v=1",
                ],
            )
        return self

    def start_apiserver(self, timeout: float = 120.0) -> None:
        self._spawn("kube-apiserver", self._apiserver_argv())
        deadline = time.monotonic() + timeout
        with self.http() as client:
            while True:
                proc = self.procs["kube-apiserver"]
                if proc.poll() is not None:
                    raise RuntimeError(f"kube-apiserver exited:\n{self.log_tail('kube-apiserver')}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/readyz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    tail = self.log_tail("kube-apiserver")
                    raise RuntimeError(f"kube-apiserver not ready:\n{tail}")
                time.sleep(0.3)

    def stop_process(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart_apiserver(self) -> None:
        self.stop_process("kube-apiserver")
        self.start_apiserver()

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self.stop_process(name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def audit_mark(self) -> int:
        """A position in the audit log: pass it to `audit` to read only what came after."""
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def audit(self, user: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """Requests logged after the mark `since`, of one user or all, one audit event each
        (the latest stage: a watch still open has only ResponseStarted)."""
        events: dict[str, dict[str, Any]] = {}
        if not self.audit_log.exists():
            return events
        with self.audit_log.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if user is None or event.get("user", {}).get("username") == user:
                events[event.get("auditID", line)] = event
        return list(events.values())

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------ clients

    def http(self, token: str | None = None) -> httpx.Client:
        """An HTTP client as cluster admin (system:masters), or with a bearer token."""
        assert self.pki is not None
        context = ssl.create_default_context(cafile=self.pki.path("ca.crt"))
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        else:
            context.load_cert_chain(self.pki.path("admin.crt"), self.pki.path("admin.key"))
        return httpx.Client(base_url=self.url, verify=context, headers=headers, timeout=30)

    def write_kubeconfig(
        self,
        path: Path,
        *,
        user: str = "admin",
        token: str | None = None,
        namespace: str | None = None,
    ) -> Path:
        assert self.pki is not None
        creds = (
            {"token": token}
            if token
            else {
                "client-certificate": self.pki.path(f"{user}.crt"),
                "client-key": self.pki.path(f"{user}.key"),
            }
        )
        context: dict[str, Any] = {"cluster": "envtest", "user": user}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "envtest",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority": self.pki.path("ca.crt"),
                    },
                }
            ],
            "users": [{"name": user, "user": creds}],
            "contexts": [{"name": "envtest", "context": context}],
            "current-context": "envtest",
        }
        path.write_text(json.dumps(config))
        return path

    def service_account_token(self, namespace: str, name: str, seconds: int = 7200) -> str:
        """A token of an existing ServiceAccount (TokenRequest API), as a pod would mount."""
        with self.http() as client:
            response = client.post(
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                json={
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"audiences": [ISSUER], "expirationSeconds": seconds},
                },
            )
            response.raise_for_status()
            return str(response.json()["status"]["token"])


@contextlib.contextmanager
def control_plane(workdir: Path, *, controller_manager: bool = True) -> Iterator[ControlPlane]:
    assets = assets_dir()
    if assets is None:
        raise RuntimeError(SKIP_MESSAGE)
    plane = ControlPlane(assets, workdir, controller_manager=controller_manager)
    try:
        yield plane.start()
    finally:
        plane.stop()


def eventually(check: Callable[[], Any], timeout: float = 30.0, message: str = "") -> Any:
    """Poll until `check` returns something truthy (and return it) or fail, naming `message`
    and the last value seen (an exception raised by `check` counts as not yet)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (AssertionError, KeyError, IndexError, TypeError, httpx.HTTPError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s: {message or check}; last: {last!r}")
