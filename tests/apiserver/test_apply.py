"""Every example, and every object the renderer makes of it (LeaderWorkerSet and StatefulSet
forms), passes server-side apply on a real API server in its own namespace, through the
commands the docs give: `ascend-serve render -f X -n NS | kubectl apply --server-side -f -`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from apiserver.conftest import run_tool, tool
from helpers import ROOT, example_paths


def _render(path, *flags: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ascend_operator.cli", "render", "-f", str(path), *flags],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": os.devnull},
        cwd=ROOT,
    )
    return result.stdout


def _server_dry_run(plane, manifest: str, namespace: str) -> list[str]:
    env = {**os.environ, "KUBECONFIG": str(plane.dir / "kubeconfig")}
    result = subprocess.run(
        [
            tool("kubectl"),
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=ascend-serve",
            "-n",
            namespace,
            "-f",
            "-",
        ],
        input=manifest,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.usefixtures("crd", "lws_crd")
@pytest.mark.parametrize("workload", ["LeaderWorkerSet", "StatefulSet"])
@pytest.mark.parametrize("path", example_paths(), ids=lambda p: p.name)
def test_rendered_objects_pass_server_side_apply(plane, namespace, path, workload):
    flags = ["-n", namespace] + ([] if workload == "LeaderWorkerSet" else ["--no-lws"])
    rendered = _render(path, *flags)
    objects = [d for d in yaml.safe_load_all(rendered) if d]
    assert {o["metadata"]["namespace"] for o in objects} == {namespace}
    assert any(o["kind"] == workload for o in objects)
    lines = _server_dry_run(plane, rendered, namespace)
    assert len(lines) == len(objects), lines
    assert all("serverside-applied (server dry run)" in line for line in lines), lines


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize("path", example_paths(), ids=lambda p: p.name)
def test_examples_apply_with_kubectl_into_any_namespace(plane, namespace, path):
    run_tool(
        plane,
        "kubectl",
        "apply",
        "--server-side",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        str(path),
    )


def test_render_uses_the_kubeconfig_namespace(plane, tmp_path):
    kubeconfig = plane.write_kubeconfig(tmp_path / "kc", namespace="team-a")
    result = subprocess.run(
        [sys.executable, "-m", "ascend_operator.cli", "render", "-f", "examples/tiny-sim.yaml"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        cwd=ROOT,
    )
    namespaces = {d["metadata"]["namespace"] for d in yaml.safe_load_all(result.stdout) if d}
    assert namespaces == {"team-a"}
