"""The `ascend-serve` command line: exit codes, messages, and output formats."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import yaml

from ascend_operator.cli import main
from helpers import EXAMPLES, manifest


def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        old = sys.stdin
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(argv), out, err)
    finally:
        if stdin is not None:
            sys.stdin = old
    return code, out.getvalue(), err.getvalue()


def test_validate_ok():
    code, out, _ = run("validate", "-f", str(EXAMPLES / "qwen3-235b-pd.yaml"))
    assert code == 0 and "is valid" in out and "48 NPU devices" in out


def test_validate_lists_every_problem_and_exits_1(tmp_path):
    doc = manifest(model={"source": {"pvc": None}}, runtime={"graphMode": "torchair"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, err = run("validate", "-f", str(path))
    assert code == 1 and out == ""
    assert "2 problems" in err
    assert "1. spec.model.source" in err and "2. spec.runtime.graphMode" in err
    assert "Fix:" in err


def test_unreadable_and_non_yaml_inputs(tmp_path):
    code, _, err = run("validate", "-f", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    code, _, err = run("validate", "-f", str(bad))
    assert code == 2 and "not valid YAML" in err
    other = tmp_path / "other.yaml"
    other.write_text("kind: ConfigMap\n")
    code, _, err = run("validate", "-f", str(other))
    assert code == 2 and "no ModelDeployment" in err
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("kind: ModelDeployment\nspec: 3\nmetadata: {name: x}\n")
    code, _, err = run("validate", "-f", str(scalar))
    assert code == 1 and "spec" in err


def test_render_from_stdin_is_a_yaml_stream():
    code, out, _ = run("render", "-f", "-", stdin=(EXAMPLES / "tiny-sim.yaml").read_text())
    assert code == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(out)]
    assert kinds[:2] == ["ConfigMap", "LeaderWorkerSet"] and kinds.count("Deployment") == 1


def test_render_fails_on_invalid_spec_without_output(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest(hardware=None)))
    code, out, err = run("render", "-f", str(path))
    assert code == 1 and out == "" and "spec.hardware" in err


def test_plan_table_shows_the_numbers():
    code, out, _ = run("plan", "-f", str(EXAMPLES / "qwen3-235b-pd.yaml"))
    assert code == 0
    assert "total 48 devices" in out
    assert "36116-36131" in out  # decode worker 1's Mooncake ports
    assert "4-7       4" in out  # decode worker 1: DP ranks 4-7, start rank 4
    assert "kv_producer kv_port=36000" in out and "kv_consumer kv_port=36100" in out
    assert "--enforce-eager" in out


def test_crd_command_and_entry_point():
    code, out, _ = run("crd")
    assert code == 0 and yaml.safe_load(out)["kind"] == "CustomResourceDefinition"
    proc = subprocess.run(
        [sys.executable, "-m", "ascend_operator.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.startswith("ascend-serve ")


def test_presets():
    code, out, _ = run("presets")
    assert code == 0 and "qwen3-235b-a22b: hidden_size=4096" in out


@pytest.fixture(autouse=True)
def no_kubeconfig(monkeypatch, tmp_path):
    """The CLI reads the kubeconfig's namespace: keep the tests off the user's."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))


def _namespaces(text: str) -> set[str]:
    return {d["metadata"]["namespace"] for d in yaml.safe_load_all(text) if d}


def test_render_namespace_follows_kubectl(tmp_path, monkeypatch):
    example = str(EXAMPLES / "tiny-sim.yaml")  # names no namespace
    assert _namespaces(run("render", "-f", example)[1]) == {"default"}
    assert _namespaces(run("render", "-f", example, "-n", "team-b")[1]) == {"team-b"}
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("current-context: c\ncontexts: [{name: c, context: {namespace: team-a}}]\n")
    second.write_text("contexts: [{name: c, context: {namespace: ignored}}]\n")
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    assert _namespaces(run("render", "-f", example)[1]) == {"team-a"}
    assert _namespaces(run("render", "-f", example, "-n", "x")[1]) == {"x"}


def test_render_refuses_a_namespace_that_contradicts_the_manifest(tmp_path):
    doc = manifest()  # metadata.namespace: ns
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, err = run("render", "-f", str(path), "-n", "other")
    assert code == 2 and out == ""
    assert "'ns'" in err and "'other'" in err
    assert _namespaces(run("render", "-f", str(path), "-n", "ns")[1]) == {"ns"}


def test_current_namespace_tolerates_broken_kubeconfigs(tmp_path):
    from ascend_operator.kubeconfig import current_namespace

    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff\xfe: [")
    assert current_namespace({"KUBECONFIG": str(bad)}) is None
    assert current_namespace({"KUBECONFIG": str(tmp_path / "missing")}) is None
    assert current_namespace({"HOME": str(tmp_path)}) is None


def test_operator_default_scope(tmp_path):
    from ascend_operator.controller.run import default_scope

    assert default_scope({"POD_NAMESPACE": "ops"})[0] == ["ops"]
    sa = tmp_path / "namespace"
    sa.write_text("serving\n")
    assert default_scope({}, str(sa))[0] == ["serving"]
    namespaces, why = default_scope({}, str(tmp_path / "absent"))
    assert namespaces == [] and "every namespace" in why
