"""The real-API-server tier: one control plane (etcd + kube-apiserver + kube-controller-manager)
for the whole test session, from KUBEBUILDER_ASSETS. Without it every test here skips, saying
how to get the binaries."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from envtest import SKIP_MESSAGE, ControlPlane, assets_dir, eventually
from helpers import ROOT
from kube import Kube
from operator_harness import OperatorProcess

COUNTER = itertools.count()


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    assets = assets_dir()
    if assets is None:
        pytest.skip(SKIP_MESSAGE)
    control = ControlPlane(assets, tmp_path_factory.mktemp("envtest"))
    try:
        control.start()
        yield control
    finally:
        control.stop()


@pytest.fixture(scope="session")
def kube(plane: ControlPlane) -> Iterator[Kube]:
    with Kube(plane) as client:
        yield client


@pytest.fixture(scope="session")
def gc(plane: ControlPlane) -> ControlPlane:
    """The control plane, for tests that need kube-controller-manager's controllers."""
    if not plane.with_kcm:
        pytest.skip(
            "needs kube-controller-manager in KUBEBUILDER_ASSETS (garbage collection, "
            "StatefulSet and Deployment controllers); ../shared/k8s/cluster.sh assets has it"
        )
    return plane


@pytest.fixture(scope="session")
def crd(kube: Kube) -> None:
    """Our CRDs installed (server-side apply of crds/, as the docs say) and Established."""
    kube.install_crds()


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace per test; deleted afterwards (without waiting)."""
    name = f"t{os.getpid() % 10000}-{next(COUNTER)}"
    kube.create_namespace(name)
    yield name
    with contextlib.suppress(Exception):
        kube.delete("Namespace", None, name)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not on PATH: run `make test` (scripts/install-tools.sh installs it)")
    return path


def run_tool(
    plane: ControlPlane, name: str, *args: str, check: bool = True, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run helm or kubectl against the control plane (as admin unless `kubeconfig`)."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig or plane.dir / "kubeconfig")}
    result = subprocess.run(
        [tool(name), *args], capture_output=True, text=True, env=env, timeout=180, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{name} {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


CHART = ROOT / "charts" / "ascend-serve"


@dataclass
class Installation:
    """The chart installed with helm; the operator runs here as a local process that
    authenticates with a token of the chart's own ServiceAccount (never system:masters)."""

    release: str
    namespace: str
    scope: str
    watched: list[str]
    service_account: str
    kubeconfig: Path

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    @property
    def scope_args(self) -> tuple[str, ...]:
        """The operator's flags, as the chart's Deployment passes them."""
        if self.scope == "cluster":
            return ("--all-namespaces",)
        return tuple(f"--namespace={ns}" for ns in self.watched)

    def operator(self, log: Path, *extra: str) -> OperatorProcess:
        return OperatorProcess(self.kubeconfig, log, *extra, scope=self.scope_args)


def helm_install(
    plane: ControlPlane,
    kube: Kube,
    release: str,
    namespace: str,
    *,
    scope: str = "cluster",
    watched: list[str] | None = None,
    extra: tuple[str, ...] = (),
) -> Installation:
    args = ["install", release, str(CHART), "-n", namespace, "--create-namespace", "--wait=false"]
    args += ["--set", f"watch.scope={scope}"]
    for i, ns in enumerate(watched or []):
        args += ["--set", f"watch.namespaces[{i}]={ns}"]
    run_tool(plane, "helm", *args, *extra)
    sa = f"{release}-ascend-serve" if "ascend-serve" not in release else release
    token = plane.service_account_token(namespace, sa)
    kubeconfig = plane.write_kubeconfig(plane.dir / f"{release}.kubeconfig", user=sa, token=token)
    return Installation(release, namespace, scope, list(watched or []), sa, kubeconfig)


def helm_uninstall(plane: ControlPlane, release: str, namespace: str) -> None:
    run_tool(plane, "helm", "uninstall", release, "-n", namespace, "--wait", check=False)


def forbidden(
    plane: ControlPlane, user: str, since: int = 0, outage: tuple[str, str] | None = None
) -> list[str]:
    """Requests of `user` the API server refused with 403 for lack of permission, as
    `verb path: message` lines. Not counted: writes into a namespace being deleted (403 too:
    the namespace lifecycle, not RBAC), and requests received during `outage` (UTC times:
    a restarted API server refuses everything until its RBAC caches fill)."""
    refused = []
    for event in plane.audit(user, since):
        status = event.get("responseStatus") or {}
        if status.get("code") != 403 or "being terminated" in str(status.get("message")):
            continue
        if outage and outage[0] <= event.get("requestReceivedTimestamp", "") <= outage[1]:
            continue
        refused.append(f"{event['verb']} {event['requestURI']}: {status.get('message')}")
    return refused


LWS_CRD_NAME = "leaderworkersets.leaderworkerset.x-k8s.io"


def lws_crd_file() -> Path:
    """The LeaderWorkerSet CRD as kubernetes-sigs/lws publishes it: ASCEND_LWS_CRD, else the
    copy in the workspace's ../shared/k8s/crds (no LWS controller runs here)."""
    name = "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
    default = ROOT.parent / "shared" / "k8s" / "crds" / name
    return Path(os.environ.get("ASCEND_LWS_CRD") or default)


@pytest.fixture(scope="module")
def lws_crd(kube: Kube) -> Iterator[Callable[[], None]]:
    """Installs the real LeaderWorkerSet CRD (call the fixture's value to remove it early);
    removed again when the module ends."""
    path = lws_crd_file()
    if not path.is_file():
        pytest.skip(
            f"needs the LeaderWorkerSet CRD file {path} (kubernetes-sigs/lws config/crd/bases); "
            "set ASCEND_LWS_CRD to it"
        )
    kube.install_crds(path)

    def remove() -> None:
        kube.delete("CustomResourceDefinition", None, LWS_CRD_NAME)
        eventually(
            lambda: kube.get("CustomResourceDefinition", None, LWS_CRD_NAME) is None,
            60,
            "the LeaderWorkerSet CRD is gone",
        )

    try:
        yield remove
    finally:
        remove()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything in this folder carries the `apiserver` marker (`make test-fast` leaves it)."""
    for item in items:
        if "tests/apiserver/" in str(item.fspath):
            item.add_marker(pytest.mark.apiserver)
