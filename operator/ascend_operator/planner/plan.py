"""The planner: a validated ModelDeployment -> Plan (pure: no I/O, no cluster).

Every problem is collected and reported at once, each naming the field and the fix. The checks
live in `checks`, one role's planning in `role`, the router's in `router`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ascend_runtime.roles import Role

from ..api.crd import structural_schema
from ..api.resource import ModelDeployment
from ..api.spec import ModelDeploymentSpec
from . import additional_config, checks, kv_aware
from .architectures import resolve_architecture
from .capabilities import capabilities_for, supported_lines
from .hardware import resolve_profile
from .problems import PlanError, PlanWarning, Problem, problems_from_validation
from .results import ClusterInfo, Plan
from .role import RoleContext, plan_role
from .router import plan_router

# --------------------------------------------------------------------------- entry points


def validate_manifest(manifest: Any) -> tuple[ModelDeployment | None, list[Problem]]:
    """Parse a manifest; return the model (or None) and the schema problems found."""
    if not isinstance(manifest, dict):
        return None, [Problem("(document)", "not a YAML mapping", "write a ModelDeployment object")]
    try:
        return ModelDeployment.from_manifest(manifest), []
    except ValidationError as exc:
        schema = {
            "properties": {
                "spec": structural_schema(ModelDeploymentSpec),
                "metadata": {"properties": {"name": {}, "namespace": {}, "labels": {}}},
                "apiVersion": {},
                "kind": {},
                "status": {},
            }
        }
        return None, problems_from_validation(exc, schema)


def plan_manifest(manifest: Any, cluster: ClusterInfo | None = None) -> Plan:
    """Manifest -> Plan; raises PlanError with every problem (schema first, then planning)."""
    md, problems = validate_manifest(manifest)
    if md is None:
        raise PlanError(problems)
    return plan(md, cluster)


def plan(md: ModelDeployment, cluster: ClusterInfo | None = None) -> Plan:
    """Plan a parsed ModelDeployment; raises PlanError listing every problem."""
    cluster = cluster or ClusterInfo()
    problems: list[Problem] = []
    spec = md.spec
    name, namespace = md.metadata.name, md.metadata.namespace

    checks.check_metadata(name, problems)
    checks.check_structure(spec, problems)
    caps = capabilities_for(spec.runtime.version)
    if caps is None:
        problems.append(
            Problem(
                "spec.runtime.version",
                f"{spec.runtime.version} is not a supported vllm-ascend release line",
                f"use one of {supported_lines()}",
            )
        )
        raise PlanError(problems)
    hw = resolve_profile(spec.hardware)
    arch = resolve_architecture(spec.model.architecture)
    checks.check_model(spec, arch, caps, problems)
    checks.check_heads(spec, arch, problems)
    checks.check_quantities(spec, problems)
    checks.check_env(spec, problems)
    kv_aware.check(spec, problems)
    warnings: list[PlanWarning] = []
    additional_config.check(spec, arch, caps, problems, warnings)

    kind, fallback = _workload_kind(
        spec.workload.kind, cluster.lws_available, cluster.recorded_workload
    )
    pd = any(r.name == Role.PREFILL for r in spec.roles)
    ctx = RoleContext(md, hw, arch, caps, cluster, kind, pd, problems, warnings)
    role_plans = []
    for idx, role in enumerate(spec.roles):
        planned = plan_role(ctx, idx, role)
        if planned is not None:
            role_plans.append(planned)
    kv_aware.check_ranks(spec, role_plans, problems)
    warnings += kv_aware.warnings(spec, caps)
    if problems:
        raise PlanError(problems)

    role_order = {Role.PREFILL: 0, Role.DECODE: 1, Role.UNIFIED: 0}
    role_plans.sort(key=lambda r: role_order[r.name])
    scaled = Role.DECODE if pd else Role.UNIFIED
    return Plan(
        name=name,
        namespace=namespace,
        uid=md.metadata.uid,
        spec=spec,
        capabilities=caps,
        hardware=hw,
        architecture=arch,
        workload_kind=kind,
        workload_fallback=fallback,
        roles=tuple(role_plans),
        router=plan_router(md, pd, cluster, role_plans),
        scaled_role=scaled,
        warnings=tuple(warnings),
    )


def _workload_kind(requested: str, lws_available: bool, recorded: str | None) -> tuple[str, bool]:
    """(kind, whether `auto` runs StatefulSets). `auto` keeps the kind a deployment already
    runs as: a LeaderWorkerSet CRD installed or removed later never migrates instances."""
    if requested != "auto":
        return requested, False
    if recorded in ("LeaderWorkerSet", "StatefulSet"):
        return recorded, recorded == "StatefulSet"
    return ("LeaderWorkerSet", False) if lws_available else ("StatefulSet", True)
