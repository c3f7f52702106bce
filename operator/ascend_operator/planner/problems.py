"""Problems found while validating or planning: each names the field and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec."""

    path: str
    """Field path as a user writes it, e.g. `spec.roles[1].parallelism.tensor`."""
    message: str
    """What is wrong, with the numbers involved."""
    fix: str
    """How to make it right."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}. Fix: {self.fix}"


@dataclass(frozen=True)
class PlanWarning(Problem):
    """Something the spec may run with but that a user should know: a value outside what
    upstream advises, or a choice the planner made for them (a fallback)."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}. Consider: {self.fix}"


class PlanError(ValueError):
    """A spec that cannot be planned; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(dict.fromkeys(problems))  # one report per distinct problem
        super().__init__(format_problems(self.problems))


def format_problems(problems: Iterable[Problem]) -> str:
    """All problems (or warnings), one per line, numbered (the text of the Validated condition
    and of the CLI)."""
    lines = [f"{i}. {p}" for i, p in enumerate(problems, 1)]
    return "\n".join(lines)


def loc_to_path(loc: Sequence[str | int], prefix: str = "") -> str:
    """('spec', 'roles', 0, 'parallelism') -> 'spec.roles[0].parallelism'."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _schema_at(schema: dict[str, Any], loc: Sequence[str | int]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for part in loc:
        if node is None:
            return None
        node = node.get("items") if isinstance(part, int) else node.get("properties", {}).get(part)
    return node


_TYPE_FIXES = {
    "int_type": "write a whole number without quotes (YAML reads true/false as booleans, "
    '"8" as a string); the API server refuses these too',
    "float_type": "write a number without quotes",
    "string_type": 'quote the value (for example "1" or "true"): YAML reads 1 as a number and '
    "true as a boolean",
    "bool_type": "write true or false without quotes",
    "list_type": "write a YAML list",
    "dict_type": "write a YAML mapping",
    "model_type": "write a YAML mapping with this object's fields",
}
"""How to fix a value of the wrong type: the planner is as strict as the CRD's schema."""


def _fix_for(error: dict[str, Any], schema: dict[str, Any] | None) -> tuple[str, str]:
    kind = error["type"]
    loc = error["loc"]
    if kind == "extra_forbidden":
        field = loc[-1]
        parent = _schema_at(schema, loc[:-1]) if schema else None
        known = sorted((parent or {}).get("properties", {}))
        close = difflib.get_close_matches(str(field), known, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        allowed = f"known fields here: {', '.join(known)}" if known else "remove it"
        return f"unknown field `{field}`", f"{hint}{allowed}"
    if kind == "missing":
        return "required field is missing", f"set `{loc[-1]}`"
    if kind in ("literal_error", "enum"):
        expected = error.get("ctx", {}).get("expected", "")
        return f"{error['msg']} (got {error.get('input')!r})", f"use one of {expected}"
    fix = _TYPE_FIXES.get(kind, "correct the value")
    return f"{error['msg']} (got {error.get('input')!r})", fix


def problems_from_validation(
    error: ValidationError, schema: dict[str, Any] | None = None
) -> list[Problem]:
    """Turn pydantic's errors into Problems with field paths and fixes."""
    problems: list[Problem] = []
    for item in error.errors():
        loc = [p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        message, fix = _fix_for({**item, "loc": loc}, schema)
        problems.append(Problem(loc_to_path(loc), message, fix))
    return problems
