"""The ModelDeployment resource as a whole: type meta, object meta, spec and status."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .base import ApiModel
from .spec import ModelDeploymentSpec
from .status import ModelDeploymentStatus

GROUP = "ascendserve.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]


class ObjectMeta(BaseModel):
    """The part of Kubernetes object metadata the planner reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=253)
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class ModelDeployment(ApiModel):
    """A model served on Ascend NPUs: one or more vLLM instances per role, plus a router."""

    api_version: Literal["ascendserve.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["ModelDeployment"] = KIND
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelDeployment:
        """Parse a manifest (as read from YAML or the API server); raises pydantic's error."""
        return cls.model_validate(manifest)
