"""The planner: ModelDeployment -> Plan, a pure function that reports every problem at once."""

from .plan import plan, plan_manifest, validate_manifest
from .problems import PlanError, PlanWarning, Problem, format_problems
from .results import ClusterInfo, Plan, PodPlan, RolePlan, RouterPlan

__all__ = [
    "ClusterInfo",
    "Plan",
    "PlanError",
    "PlanWarning",
    "PodPlan",
    "Problem",
    "RolePlan",
    "RouterPlan",
    "format_problems",
    "plan",
    "plan_manifest",
    "validate_manifest",
]
