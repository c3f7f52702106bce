"""Generate the ModelDeployment CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema 2020-12 with `$ref`s and `anyOf: [X, null]` for optional fields;
Kubernetes wants a structural OpenAPI v3 schema: everything inlined, one type per node, no
`additionalProperties: false`, boolean `exclusiveMinimum`. `structural_schema` does that
conversion; `crd_manifest` wraps it with names, subresources and printer columns.
"""

from __future__ import annotations

import copy
from typing import Any

from .resource import API_VERSION, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from .spec import ModelDeploymentSpec
from .status import ModelDeploymentStatus

MAX_NAME_LENGTH = 39
"""Longest ModelDeployment name whose child names (`<name>-prefill-<i>-<ordinal>` and the
StatefulSet revision-hash label) stay within Kubernetes' 63-character limits."""

_DROP_KEYS = {"title", "$defs"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        target.update(node)  # the field's own description/default win over the class's
        node = target
    any_of = node.get("anyOf")
    if any_of and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in any_of if b.get("type") != "null"]
        if len(branches) == 1:
            del node["anyOf"]
            merged = dict(branches[0])
            merged.update(node)
            node = merged
            if node.get("default", 0) is None:
                del node["default"]
            return _resolve(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "default" and value is None:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
            continue
        out[key] = _resolve(value, defs)
    if "description" in out:
        out["description"] = " ".join(out["description"].split())
    return out


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in, recursively, as the API server does
    for objects it stores."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = defaulted(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [defaulted(schema["items"], item) for item in value]
    return value


def _complete_defaults(node: Any) -> None:
    """Expand every object default (`{}`) with its properties' own defaults.

    The API server evaluates a node's CEL rules against its default value as written, without
    defaulting inside it: `parallelism: {default: {}}` with a rule over `self.tensor` makes
    the whole CRD invalid ("no such key"). Complete defaults give CEL what it reads."""
    if isinstance(node, list):
        for item in node:
            _complete_defaults(item)
        return
    if not isinstance(node, dict):
        return
    for value in node.values():
        if isinstance(value, dict | list):
            _complete_defaults(value)
    if isinstance(node.get("default"), dict) and "properties" in node:
        node["default"] = defaulted(node, node["default"])


def structural_schema(model: type) -> dict[str, Any]:
    """A pydantic model's validation schema as a Kubernetes structural schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = _resolve(raw, raw.get("$defs", {}))
    _complete_defaults(schema)
    return schema


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
        {"name": "Roles", "type": "string", "jsonPath": ".status.roleSummary"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "priority": 1},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.routerEndpoint", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


SCALE_REPLICAS_PATH = ".spec.replicas"


def _spec_schema() -> dict[str, Any]:
    spec = structural_schema(ModelDeploymentSpec)
    # The API server itself checks the scale subresource's replicas field ("should be a
    # non-negative integer"); a schema minimum would report the same problem twice.
    spec["properties"]["replicas"].pop("minimum", None)
    return spec


def crd_manifest() -> dict[str, Any]:
    """The complete CustomResourceDefinition of ModelDeployment."""
    schema = {
        "type": "object",
        "description": (
            "A model served on Ascend NPUs: vLLM (with vllm-ascend) instances per role, "
            "optionally prefill/decode disaggregated, behind an OpenAI-compatible router."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _spec_schema(),
            "status": structural_schema(ModelDeploymentStatus),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                "message": (
                    f"metadata.name must be at most {MAX_NAME_LENGTH} characters so that "
                    "pod and workload names stay within Kubernetes limits"
                ),
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {
                "app.kubernetes.io/name": "ascend-serve",
                "app.kubernetes.io/part-of": "ascend-serve",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["ascend-serve"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": SCALE_REPLICAS_PATH,
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


__all__ = ["API_VERSION", "MAX_NAME_LENGTH", "crd_manifest", "defaulted", "structural_schema"]
