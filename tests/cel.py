"""A small evaluator of a CRD's CEL rules (x-kubernetes-validations) with cel-python, plus
structural defaulting, so tests can check what the API server would accept."""

from __future__ import annotations

import copy
from typing import Any

import celpy

from ascend_operator.api.crd import defaulted

_ENV = celpy.Environment()
_CACHE: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _CACHE:
        _CACHE[rule] = _ENV.program(_ENV.compile(rule))
    return _CACHE[rule]


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Fill `default`s the way the API server does (recursively, before validation); the real
    server's own defaulting is checked in tests/apiserver."""
    return defaulted(schema, copy.deepcopy(obj))


def violations(schema: dict[str, Any], obj: Any, path: str = "self") -> list[str]:
    """Messages of every CEL rule that `obj` breaks (obj should already be defaulted)."""
    found: list[str] = []
    for entry in schema.get("x-kubernetes-validations", []):
        result = _program(entry["rule"]).evaluate({"self": celpy.json_to_cel(obj)})
        if isinstance(result, Exception):
            raise AssertionError(
                f"CEL rule {entry['rule']!r} failed to evaluate at {path}: {result}"
            )
        if not bool(result):
            found.append(f"{path}: {entry['message']}")
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                found += violations(sub, obj[name], f"{path}.{name}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += violations(schema["items"], item, f"{path}[{i}]")
    return found


def crd_violations(crd: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return violations(schema, apply_defaults(schema, manifest))
