"""vllm-ascend's own deployments (its nightly CI configs and its Qwen3-235B tutorial, as facts in
tests/fixtures/upstream_deployments.yaml) written as ModelDeployments: each validates, and every
pod renders upstream's flags and environment, up to the differences the fixture lists with their
reasons. A listed difference that no longer occurs fails too, so the list stays true."""

from __future__ import annotations

import json
import shlex
from functools import cache
from typing import Any

import pytest
import yaml

from ascend_operator.planner import plan_manifest
from ascend_runtime.config import PodIdentity
from ascend_runtime.engine_command import engine_command
from helpers import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "upstream_deployments.yaml"
SPELLINGS = {"--additional_config": "--additional-config"}
"""vLLM's parser takes either spelling."""


@cache
def fixture() -> dict[str, Any]:
    return yaml.safe_load(FIXTURE.read_text())


def _flags(argv: list[str]) -> dict[str, Any]:
    """`--flag value` pairs (True for a bare flag), JSON values parsed and flattened to
    `--flag.key.sub` entries so a difference can name one key."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        flag = SPELLINGS.get(argv[i], argv[i])
        assert flag.startswith("--"), f"positional argument {flag!r} after the model"
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value: Any = argv[i + 1]
            i += 2
        else:
            value, i = True, i + 1
        if isinstance(value, str) and value.startswith("{"):
            out |= _flatten(flag, json.loads(value))
        else:
            out[flag] = value
    return out


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, sub in value.items():
            flat |= _flatten(f"{prefix}.{key}", sub)
        return flat
    return {prefix: value}


def _same(a: Any, b: Any) -> bool:
    """Equal as vLLM reads them: "30000" and 30000 are one port, `true` and "true" one flag."""
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    return a == b or str(a) == str(b)


def _diff(ours: dict[str, Any], theirs: dict[str, Any]) -> set[str]:
    return {k for k in ours.keys() | theirs.keys() if not _same(ours.get(k), theirs.get(k))}


def _covers(listed: str, key: str) -> bool:
    """A listed difference names a flag, a key inside a JSON flag, or a whole JSON subtree."""
    return key == listed or key.startswith(f"{listed}.")


def _explained(key: str, *allowed: dict[str, str]) -> bool:
    return any(_covers(listed, key) for table in allowed for listed in table)


def _stale(listed: dict[str, str], found: set[str]) -> set[str]:
    return {d for d in listed if not any(_covers(d, k) for k in found)}


def _pod_command(plan: Any, role_name: str, instance: int, worker: int) -> tuple[dict, dict]:
    role = next(r for r in plan.roles if r.name == role_name)
    assert instance < role.instances, f"{role_name} has {role.instances} instances"
    pod = next(p for p in role.pods if p.worker_index == worker)
    ident = PodIdentity(
        instance=instance, worker_index=pod.worker_index, pod_ip="$POD_IP", leader_address="$LEADER"
    )
    command = engine_command(role.runtime_config, ident)
    argv = command.argv
    assert argv[:2] == ["vllm", "serve"]
    return _flags(argv[3:]), {f"env.{k}": v for k, v in command.env.items()}


def case_names() -> list[str]:
    return sorted(fixture()["cases"])


@pytest.mark.parametrize("name", case_names())
def test_renders_upstream_flags_and_environment(name: str) -> None:
    case = fixture()["cases"][name]
    common = fixture()["common_differences"]
    plan = plan_manifest(case["manifest"])
    warned = {w.path for w in plan.warnings}
    assert set(case.get("expected_warnings", [])) <= warned, plan.warnings
    upstream_env = {f"env.{k}": str(v) for k, v in case["upstream_env"].items()}
    case_allowed = case.get("differences") or {}
    case_seen: set[str] = set()
    for pod in case["pods"]:
        ours_flags, ours_env = _pod_command(
            plan, pod["role"], pod.get("instance", 0), pod["worker"]
        )
        theirs_flags = _flags(shlex.split(pod["command"]))
        found = _diff(ours_flags, theirs_flags) | _diff(ours_env, upstream_env)
        pod_allowed = pod.get("differences") or {}
        where = f"{name}: {pod['role']} instance {pod.get('instance', 0)} worker {pod['worker']}"
        unexplained = {
            k: (ours_flags.get(k, ours_env.get(k)), theirs_flags.get(k, upstream_env.get(k)))
            for k in found
            if not _explained(k, common, case_allowed, pod_allowed)
        }
        assert not unexplained, f"{where}: (ours, upstream) differ without a reason: {unexplained}"
        stale = _stale(pod_allowed, found)
        assert not stale, f"{where}: listed differences that no longer occur: {stale}"
        case_seen |= found
    stale = _stale(case_allowed, case_seen)
    assert not stale, f"{name}: listed differences that no longer occur: {stale}"


def test_every_common_difference_still_occurs() -> None:
    seen: set[str] = set()
    for name in case_names():
        case = fixture()["cases"][name]
        plan = plan_manifest(case["manifest"])
        upstream_env = {f"env.{k}": str(v) for k, v in case["upstream_env"].items()}
        for pod in case["pods"]:
            ours_flags, ours_env = _pod_command(
                plan, pod["role"], pod.get("instance", 0), pod["worker"]
            )
            theirs = _flags(shlex.split(pod["command"]))
            seen |= _diff(ours_flags, theirs) | _diff(ours_env, upstream_env)
    stale = _stale(fixture()["common_differences"], seen)
    assert not stale, f"common differences that no longer occur: {stale}"


def test_the_cases_the_issue_names_are_all_here() -> None:
    sources = " ".join(c["source"] for c in fixture()["cases"].values())
    for config in (
        "Qwen3-235B-A22B.yaml", "Qwen3-235B-A22B-A2.yaml", "Qwen3-235B-disagg-pd.yaml",
        "Qwen3-235B-W8A8.yaml", "DeepSeek-V3.1-BF16.yaml", "DeepSeek-R1-W8A8-EPLB.yaml",
        "Qwen3-235B-A22B.md",
    ):  # fmt: skip
        assert config in sources
