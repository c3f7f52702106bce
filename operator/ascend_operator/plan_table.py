"""A readable summary of a Plan (`ascend-serve plan`)."""

from __future__ import annotations

import json

from .planner.explain import chosen_defaults
from .planner.results import Plan, RolePlan


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, *body])


def _ranks(ranks: tuple[int, ...]) -> str:
    return f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _key_flags(role: RolePlan) -> list[str]:
    cfg = role.runtime_config
    flags = []
    args = cfg.engine_args
    for flag in (
        "--compilation-config",
        "--additional-config",
        "--speculative-config",
        "--hf-overrides",
        "--rope-scaling",
    ):
        if flag in args:
            flags.append(f"{flag} {args[args.index(flag) + 1]}")
    for flag in ("--enforce-eager", "--enable-expert-parallel", "--async-scheduling"):
        if flag in args:
            flags.append(flag)
    if cfg.kv_transfer is not None:
        kv = cfg.kv_transfer
        flags.append(
            f"kv-transfer: {kv.connector} {kv.kv_role} kv_port={kv.kv_port} "
            f"engine_id={kv.engine_id_prefix}-<instance> "
            f"extra={json.dumps(kv.extra_config, separators=(',', ':'))}"
        )
    if role.capture_sizes:
        sizes = list(role.capture_sizes)
        shown = sizes if len(sizes) <= 8 else [*sizes[:6], "...", sizes[-1]]
        source = "explicit" if role.capture_sizes_explicit else "vLLM default"
        flags.append(f"capture sizes ({source}): {', '.join(map(str, shown))}")
    if role.hccl_buffer_mb:
        flags.append(f"HCCL_BUFFSIZE={role.hccl_buffer_mb}")
    return flags


def plan_table(plan: Plan) -> str:
    """Roles, pods, devices, ranks, ports and key flags of a plan."""
    spec = plan.spec
    fallback = " (fallback: LeaderWorkerSet missing)" if plan.workload_fallback else ""
    head = [
        f"ModelDeployment {plan.namespace}/{plan.name}: model {spec.model.name}, engine "
        f"{spec.runtime.engine}, vllm-ascend {spec.runtime.version} (line "
        f"{plan.capabilities.line}, vLLM {plan.capabilities.vllm})",
        f"hardware: {plan.hardware.name} ({plan.hardware.devices_per_node} devices/node, "
        f"resource {plan.hardware.resource_name or 'none requested'}); workload "
        f"{plan.workload_kind}{fallback}; "
        f"total {plan.total_devices} devices",
        "",
    ]
    rows = []
    for r in plan.roles:
        c = r.runtime_config.topology
        rows.append(
            [
                r.name,
                str(r.instances),
                str(r.pods_per_instance),
                str(r.devices_per_pod),
                f"{c.tensor}/{c.pipeline}/{c.data}/{c.data_local}",
                f"{c.prefill_context}/{c.decode_context}",
                "yes" if c.expert else "no",
                r.graph_mode,
                str(r.total_devices),
            ]
        )
    out = [
        *head,
        _table(
            [
                "ROLE",
                "INSTANCES",
                "PODS/INST",
                "DEVICES/POD",
                "TP/PP/DP/DPLOCAL",
                "PCP/DCP",
                "EP",
                "GRAPH",
                "DEVICES",
            ],
            rows,
        ),
        "",
    ]
    for r in plan.roles:
        pod_rows = [
            [
                str(p.worker_index),
                "leader" if p.leader else "worker",
                _ranks(p.dp_ranks),
                str(p.dp_ranks[0]) if p.worker_index else "-",
                str(p.devices),
                f"{p.kv_ports[0]}-{p.kv_ports[1]}" if p.kv_ports else "-",
            ]
            for p in r.pods
        ]
        out.append(
            f"{r.name}: workload {r.workload_name}, service {r.service_name}, image {r.image}"
        )
        out.append(
            _table(["WORKER", "ROLE", "DP RANKS", "START RANK", "DEVICES", "KV PORTS"], pod_rows)
        )
        out += [f"  {f}" for f in _key_flags(r)]
        if r.memory is not None:
            out.append(f"  {r.memory.summary()}")
        role_spec = next(x for x in spec.roles if x.name == r.name)
        chosen = chosen_defaults(spec, role_spec, r.runtime_config.env, r.graph_mode)
        if chosen:
            out.append(
                "  chosen here where vLLM's default differs (unsetEnv or the field changes each):"
            )
            out += [f"    {c}" for c in chosen]
        out.append("")
    out.append(
        f"router: {plan.router.replicas} replica(s), mode {plan.router.config.mode}, "
        f"endpoint {plan.router.endpoint}"
    )
    out += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(out) + "\n"
