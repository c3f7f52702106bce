"""Shared helpers: example manifests and a small builder for specs under test."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def example_paths() -> list[pathlib.Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `patch` into a copy of `base` (a value of None deletes the key)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def manifest(**spec_patch: Any) -> dict[str, Any]:
    """A valid one-node A3 unified deployment, with `spec` patched."""
    base = {
        "apiVersion": "ascendserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {
            "model": {
                "name": "qwen3",
                "source": {"pvc": {"claimName": "models", "path": "Qwen3-235B-A22B"}},
                "architecture": {"preset": "qwen3-235b-a22b"},
            },
            "hardware": {"profile": "A3"},
            "roles": [{"name": "unified", "parallelism": {"tensor": 4, "data": 4, "expert": True}}],
        },
    }
    return merge(base, {"spec": spec_patch}) if spec_patch else base


def pd_roles(
    prefill: dict[str, Any] | None = None,
    decode: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Prefill TP8 DP2 + decode TP4 DP8 roles, each patched."""
    p = merge(
        {
            "name": "prefill",
            "graphMode": "eager",
            "parallelism": {"tensor": 8, "data": 2, "expert": True},
        },
        prefill or {},
    )
    d = merge(
        {"name": "decode", "parallelism": {"tensor": 4, "data": 8, "dataLocal": 4, "expert": True}},
        decode or {},
    )
    return [p, d]


async def until(predicate: Any, timeout: float = 20.0) -> None:
    """Wait on the running event loop until `predicate()` holds; fail after `timeout` s."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)
