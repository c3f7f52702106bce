"""kubectl accepts the generated CRD, the examples and the rendered objects
(`kubectl apply --dry-run=client`) against KMock's Kubernetes API.

KMock serves discovery but not OpenAPI, so kubectl runs with --validate=false here; schema
validation of the same objects is covered by test_crd.py / test_render.py
(kubernetes-validate against the Kubernetes 1.34 schemas)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers import ROOT, example_paths
from kmock_server import kmock_api, write_kubeconfig

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not on PATH: run `make test` (scripts/install-tools.sh installs it)",
)


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory):
    with kmock_api() as (url, _):
        yield write_kubeconfig(tmp_path_factory.mktemp("kube") / "config", url)


def kubectl(kubeconfig, *args, stdin=None):
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        [KUBECTL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_crd_applies(kubeconfig):
    crd = ROOT / "crds" / "modeldeployments.ascendserve.dev.yaml"
    result = kubectl(kubeconfig, "apply", "--dry-run=client", "--validate=false", "-f", str(crd))
    assert result.returncode == 0, result.stderr
    assert "modeldeployments.ascendserve.dev created (dry run)" in result.stdout


@pytest.mark.parametrize("path", example_paths(), ids=lambda p: p.name)
def test_examples_and_rendered_objects_apply(kubeconfig, path):
    result = kubectl(kubeconfig, "apply", "--dry-run=client", "--validate=false", "-f", str(path))
    assert result.returncode == 0, result.stderr
    rendered = subprocess.run(
        ["ascend-serve", "render", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout
    result = kubectl(
        kubeconfig, "apply", "--dry-run=client", "--validate=false", "-f", "-", stdin=rendered
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(dry run)") == rendered.count("\nkind: ")
