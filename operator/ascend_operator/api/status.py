"""ModelDeployment status, written by the operator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ascend_runtime.roles import RoleName

from .base import ApiModel

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]
ConditionType = Literal[
    "Validated",
    "Reconciled",
    "Ready",
    "Progressing",
    "Degraded",
    "WorkloadFallback",
    "WorkloadAvailable",
]
WorkloadKind = Literal["LeaderWorkerSet", "StatefulSet"]


class Condition(ApiModel):
    """One observation about the deployment, in the Kubernetes condition convention."""

    type: ConditionType
    """Validated, Reconciled, Ready, Progressing (a rollout is under way), Degraded,
    WorkloadFallback (`auto` runs StatefulSets) or WorkloadAvailable (False when the API server
    no longer serves the deployment's workload kind)."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(max_length=1024)
    """CamelCase machine-readable reason."""
    message: str = Field(default="", max_length=32768)
    """Human-readable explanation (for Validated=False: every problem, one per line)."""
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}
    )
    """When the status last changed."""
    observed_generation: int | None = None
    """The spec generation this condition describes."""


class RoleStatus(ApiModel):
    """Progress of one role."""

    name: RoleName
    """The role."""
    desired_instances: int = 0
    """Instances the spec asks for."""
    ready_instances: int = 0
    """Instances whose every pod is ready."""
    updated_instances: int = 0
    """Instances running the desired pod template (a rollout is done when this equals
    desiredInstances)."""
    pods_per_instance: int = 1
    """Pods in one instance."""
    workload_kind: WorkloadKind | None = None
    """Workload kind running this role."""


class ModelDeploymentStatus(ApiModel):
    """Observed state of a ModelDeployment."""

    observed_generation: int | None = None
    """The spec generation last acted on."""
    phase: Phase | None = None
    """Pending, Progressing, Ready, Degraded or Failed."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Validated, Reconciled, Ready, Progressing, Degraded, WorkloadFallback,
    WorkloadAvailable."""
    roles: list[RoleStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Per-role instance counts."""
    replicas: int | None = None
    """Ready instances of the scaled role (scale subresource)."""
    selector: str | None = None
    """Label selector of the scaled role's pods (scale subresource, for autoscalers)."""
    ready: str | None = None
    """Ready over desired instances, all roles together (printer column), e.g. `3/3`."""
    role_summary: str | None = None
    """Roles and their ready instances (printer column), e.g. `prefill 1/1, decode 2/2`."""
    router_endpoint: str | None = None
    """In-cluster URL of the router."""
    workload_kind: WorkloadKind | None = None
    """The workload kind the instances run as, recorded when the deployment is first created;
    `spec.workload.kind: auto` keeps it (a change of what the cluster offers never migrates
    running instances; an explicit spec.workload.kind does)."""
