"""vllm-ascend's `--additional-config` of one role: the typed fields (EPLB, CPU binding,
npugraph_ex) spelled as the runtime line reads them, TorchAir's graph settings, and the
pass-through keys, in one JSON object (vLLM keeps only the last `--additional-config`)."""

from __future__ import annotations

from typing import Any

from ..api.spec import AdditionalConfig, Eplb, ModelDeploymentSpec, RoleSpec
from .architectures import Architecture
from .capabilities import RuntimeCapabilities
from .problems import PlanWarning, Problem

DYNAMIC_EPLB_ENV = "DYNAMIC_EPLB"
"""The guard vllm-ascend asserts next to `dynamic_eplb: true`."""

_EPLB_FIX = "use additionalConfig.eplb"
OWNED_KEYS: dict[str, str] = {
    "torchair_graph_config": "use graphMode: torchair (with captureSizes for its batch sizes)",
    "eplb_config": _EPLB_FIX,
    **dict.fromkeys(
        (
            "dynamic_eplb", "expert_map_path", "eplb_policy_type", "init_redundancy_expert",
            "num_iterations_eplb_update", "num_wait_worker_iterations",
        ),
        _EPLB_FIX,
    ),
    "enable_cpu_binding": "use additionalConfig.cpuBinding",
    "enable_npugraph_ex": "use additionalConfig.npugraphEx",
    "enable_fused_mc2": "use spec.runtime.fusedMc2 and fusedMc2Kernel",
}  # fmt: skip
"""Keys a typed field renders, and what to write instead."""

_EPLB_KEYS = {
    # field: (nested eplb_config key, v0.11's top-level key)
    "dynamic": ("dynamic_eplb", "dynamic_eplb"),
    "expert_map_path": ("expert_map_path", "expert_map_path"),
    "num_redundant_experts": ("num_redundant_experts", "init_redundancy_expert"),
    "expert_heat_collection_interval": (
        "expert_heat_collection_interval", "num_iterations_eplb_update",
    ),
    "algorithm_execution_interval": (
        "algorithm_execution_interval", "num_wait_worker_iterations",
    ),
    "policy_type": ("eplb_policy_type", "eplb_policy_type"),
    "heat_collection_stage": ("eplb_heat_collection_stage", None),
}  # fmt: skip

ADDITIONAL_CONFIG_FLAGS = ("--additional-config", "--additional_config")


def effective(spec: ModelDeploymentSpec, role: RoleSpec) -> AdditionalConfig:
    """spec.runtime.additionalConfig with the role's laid over it: each typed field the role
    sets wins; `extra` is merged key by key."""
    base = spec.runtime.additional_config or AdditionalConfig()
    over = role.additional_config
    if over is None:
        return base
    merged = base.model_copy(update={k: getattr(over, k) for k in over.model_fields_set})
    return merged.model_copy(update={"extra": {**base.extra, **over.extra}})


def render(
    spec: ModelDeploymentSpec,
    role: RoleSpec,
    caps: RuntimeCapabilities,
    torchair: dict[str, object] | None,
) -> dict[str, Any]:
    """The role's additional-config object ({} when there is nothing to pass)."""
    cfg = effective(spec, role)
    out: dict[str, Any] = {}
    if torchair is not None:
        out["torchair_graph_config"] = torchair
    if cfg.eplb is not None:
        out |= _eplb(cfg.eplb, caps)
    if cfg.cpu_binding is not None:
        out["enable_cpu_binding"] = cfg.cpu_binding
    extra = dict(cfg.extra)
    if cfg.npugraph_ex is not None:
        if caps.npugraph_ex == "top-level":
            out["enable_npugraph_ex"] = cfg.npugraph_ex
        elif caps.npugraph_ex == "compilation-config":
            compilation = extra.pop("ascend_compilation_config", None)
            compilation = dict(compilation) if isinstance(compilation, dict) else {}
            out["ascend_compilation_config"] = {
                **compilation,
                "enable_npugraph_ex": cfg.npugraph_ex,
            }
    return out | extra


def _eplb(eplb: Eplb, caps: RuntimeCapabilities) -> dict[str, Any]:
    flat = caps.eplb_form == "flat"
    values: dict[str, Any] = {}
    for name, (nested_key, flat_key) in _EPLB_KEYS.items():
        value = getattr(eplb, name)
        key = flat_key if flat else nested_key
        if value is not None and key is not None:
            values[key] = value
    return values if flat else {"eplb_config": values}


def environment(spec: ModelDeploymentSpec, role: RoleSpec) -> dict[str, str]:
    """Environment the additional config needs: vllm-ascend asserts `DYNAMIC_EPLB=true` next
    to dynamic EPLB."""
    eplb = effective(spec, role).eplb
    return {DYNAMIC_EPLB_ENV: "true"} if eplb is not None and eplb.dynamic else {}


def check(
    spec: ModelDeploymentSpec,
    arch: Architecture,
    caps: RuntimeCapabilities,
    problems: list[Problem],
    warnings: list[PlanWarning],
) -> None:
    """Keys the typed fields own, fields the runtime line lacks, EPLB without experts, keys
    vllm-ascend would ignore, and an `--additional-config` in extraArgs that would replace ours."""
    levels = [("spec.runtime.additionalConfig", spec.runtime.additional_config)]
    levels += [
        (f"spec.roles[{i}].additionalConfig", r.additional_config) for i, r in enumerate(spec.roles)
    ]
    for path, cfg in levels:
        if cfg is not None:
            _check_level(path, cfg, arch, caps, problems=problems, warnings=warnings)
    for i, role in enumerate(spec.roles):
        _check_role(spec, i, role, caps, problems=problems, warnings=warnings)


def _check_level(
    path: str,
    cfg: AdditionalConfig,
    arch: Architecture,
    caps: RuntimeCapabilities,
    *,
    problems: list[Problem],
    warnings: list[PlanWarning],
) -> None:
    line = caps.line
    for key, value in cfg.extra.items():
        where = f"{path}.extra.{key}"
        if key in OWNED_KEYS:
            problems.append(Problem(where, f"{key} is rendered by a typed field", OWNED_KEYS[key]))
        elif key not in caps.additional_config_keys:
            warnings.append(
                PlanWarning(
                    where,
                    f"vllm-ascend {line} reads no additional-config key {key!r}: it has no effect",
                    "check the key against that release's additional-config options, or remove it",
                )
            )
        elif key == "ascend_compilation_config":
            if not isinstance(value, dict):
                problems.append(Problem(where, "must be an object", "write it as a mapping"))
            elif "enable_npugraph_ex" in value:
                problems.append(
                    Problem(
                        f"{where}.enable_npugraph_ex",
                        "enable_npugraph_ex is rendered by a typed field",
                        OWNED_KEYS["enable_npugraph_ex"],
                    )
                )
    if cfg.npugraph_ex is not None and caps.npugraph_ex == "none":
        problems.append(
            Problem(
                f"{path}.npugraphEx",
                f"vllm-ascend {line} has no npugraph_ex backend",
                "remove npugraphEx, or use v0.13 or later",
            )
        )
    eplb = cfg.eplb
    if eplb is None:
        return
    if eplb.heat_collection_stage is not None and not caps.eplb_heat_stage:
        problems.append(
            Problem(
                f"{path}.eplb.heatCollectionStage",
                f"vllm-ascend {line} has no eplb_heat_collection_stage",
                "remove it, or use v0.23 or later",
            )
        )
    if arch.num_experts == 0:
        problems.append(
            Problem(
                f"{path}.eplb",
                "expert load balancing needs a MoE model; the architecture has no experts",
                "remove eplb, or fix spec.model.architecture",
            )
        )


def _check_role(
    spec: ModelDeploymentSpec,
    idx: int,
    role: RoleSpec,
    caps: RuntimeCapabilities,
    *,
    problems: list[Problem],
    warnings: list[PlanWarning],
) -> None:
    path = f"spec.roles[{idx}]"
    cfg = effective(spec, role)
    graph = role.graph_mode or spec.runtime.graph_mode
    renders = bool(render(spec, role, caps, {} if graph == "torchair" else None))
    for level, args in (("spec.runtime", spec.runtime.extra_args), (path, role.extra_args)):
        given = [a for a in args if a.split("=", 1)[0] in ADDITIONAL_CONFIG_FLAGS]
        if given and renders:
            problems.append(
                Problem(
                    f"{level}.extraArgs",
                    f"{given[0].split('=', 1)[0]} would replace the additional config the "
                    f"planner renders for {role.name} (vLLM keeps the last one)",
                    "move its keys to additionalConfig.extra",
                )
            )
    if cfg.eplb is None:
        return
    if not role.parallelism.expert:
        warnings.append(
            PlanWarning(
                f"{path}.parallelism.expert",
                f"{role.name}: expert load balancing moves experts between expert-parallel "
                "ranks; without expert parallelism it has no effect",
                "set parallelism.expert: true, or remove additionalConfig.eplb",
            )
        )
    unset = {*spec.runtime.unset_env, *role.unset_env}
    if cfg.eplb.dynamic and DYNAMIC_EPLB_ENV in unset:
        problems.append(
            Problem(
                f"{path}.unsetEnv",
                f"dynamic EPLB needs {DYNAMIC_EPLB_ENV}=true (vllm-ascend asserts it)",
                f"keep {DYNAMIC_EPLB_ENV}, or set eplb.dynamic: false",
            )
        )
