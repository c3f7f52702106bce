"""Shared building blocks of the API models: camelCase fields, forbidden extras, CEL rules."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
        # As strict as the CRD: `maxNumSeqs: true` or `tensor: "8"` is refused here as the
        # API server refuses it, instead of becoming 1 or 8 on the CLI only.
        strict=True,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in YAML: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry (a CEL rule the API server evaluates)."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def cel_rules(*rules: dict[str, str], **extra: Any) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules (and any other schema keys) for a model or field."""
    return {"x-kubernetes-validations": list(rules), **extra}


def _quantity_to_str(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
        }
    ),
]
"""A Kubernetes resource quantity such as `64Gi`, `500m` or `8`."""
