"""The planner: ModelDeployment -> Plan, a pure function that reports every problem at once."""

from .plan import (
    ClusterInfo,
    Plan,
    PodPlan,
    RolePlan,
    RouterPlan,
    plan,
    plan_manifest,
    validate_manifest,
)
from .problems import PlanError, Problem, format_problems

__all__ = [
    "ClusterInfo",
    "Plan",
    "PlanError",
    "PodPlan",
    "Problem",
    "RolePlan",
    "RouterPlan",
    "format_problems",
    "plan",
    "plan_manifest",
    "validate_manifest",
]
