"""The renderer: Plan -> Kubernetes objects (pure)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..planner.results import Plan
from .engine import role_objects
from .router import router_objects


def render(plan: Plan) -> list[dict[str, Any]]:
    """Every object of a deployment, roles first (prefill before decode), then the router."""
    objects: list[dict[str, Any]] = []
    for role in plan.roles:
        objects += role_objects(plan, role)
    objects += router_objects(plan)
    return objects


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True  # write shared values (a probe's httpGet) out in full, no &anchors


_YAML12_NUMBER = re.compile(
    r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+|[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
)
"""Plain scalars YAML 1.2 reads as numbers (kubectl does): PyYAML's 1.1 resolver leaves some
unquoted, such as `0271197214080670`, a template hash that happens to be all digits."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else "'" if _YAML12_NUMBER.fullmatch(data) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """A YAML stream (`---` separated), multi-line strings as blocks, keys in render order."""
    return "".join(
        "---\n" + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=100) for obj in objects
    )


__all__ = ["render", "to_yaml"]
