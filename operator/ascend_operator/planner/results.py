"""What the planner takes about the cluster and what it returns: Plan and its parts, the
renderer's only input."""

from __future__ import annotations

from dataclasses import dataclass, field

from ascend_runtime.config import RouterConfig, RuntimeConfig
from ascend_runtime.roles import Role

from .. import images
from ..api.spec import ModelDeploymentSpec
from .architectures import Architecture
from .capabilities import RuntimeCapabilities
from .hardware import HardwareProfile
from .memory import MemoryBudget
from .problems import PlanWarning


@dataclass(frozen=True)
class ClusterInfo:
    """What the planner needs to know about the target cluster."""

    lws_available: bool = True
    image_registry: str = images.DEFAULT_REGISTRY
    recorded_workload: str | None = None
    """The workload kind the deployment already runs as (its status, or its live children);
    `spec.workload.kind: auto` keeps it."""


@dataclass(frozen=True)
class PodPlan:
    """One pod of an instance."""

    worker_index: int
    dp_ranks: tuple[int, ...]
    devices: int
    leader: bool
    kv_ports: tuple[int, int] | None
    """First and last Mooncake port this pod's ranks use (side channels and handshakes)."""


@dataclass(frozen=True)
class RolePlan:
    """Everything decided for one role."""

    name: str
    instances: int
    pods_per_instance: int
    devices_per_pod: int
    ranks_devices: int
    graph_mode: str
    capture_sizes: tuple[int, ...] | None
    capture_sizes_explicit: bool
    num_speculative_tokens: int | None
    hccl_buffer_mb: int | None
    pods: tuple[PodPlan, ...]
    runtime_config: RuntimeConfig
    image: str
    workload_name: str
    service_name: str
    configmap_name: str
    memory: MemoryBudget | None = None
    """Estimated memory per device (engine vllm on NPUs, architecture known)."""

    @property
    def total_pods(self) -> int:
        return self.instances * self.pods_per_instance

    @property
    def total_devices(self) -> int:
        return self.total_pods * self.devices_per_pod


@dataclass(frozen=True)
class RouterPlan:
    """The router Deployment."""

    name: str
    service_name: str
    replicas: int
    image: str
    config: RouterConfig
    endpoint: str


@dataclass(frozen=True)
class Plan:
    """A validated deployment topology: the renderer's only input."""

    name: str
    namespace: str
    uid: str | None
    spec: ModelDeploymentSpec
    capabilities: RuntimeCapabilities
    hardware: HardwareProfile
    architecture: Architecture
    workload_kind: str
    workload_fallback: bool
    """True when `auto` runs StatefulSets (LeaderWorkerSet was missing when it was created)."""
    roles: tuple[RolePlan, ...]
    router: RouterPlan
    scaled_role: str
    """The role the scale subresource drives: unified, or decode in PD."""
    warnings: tuple[PlanWarning, ...] = field(default=())
    """What the spec may run with but a user should know (validate, plan and the Validated
    condition show them)."""

    @property
    def pd(self) -> bool:
        return any(r.name == Role.PREFILL for r in self.roles)

    @property
    def total_devices(self) -> int:
        """NPU devices requested from the cluster (0 for sim runs without spec.hardware)."""
        if self.hardware.resource_name is None:
            return 0
        return sum(r.total_devices for r in self.roles)

    def role(self, name: str) -> RolePlan:
        return next(r for r in self.roles if r.name == name)
