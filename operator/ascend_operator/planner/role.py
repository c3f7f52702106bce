"""Planning one role: graphs, HCCL buffer, KV transfer, pods, and the RuntimeConfig every pod
of the role reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ascend_runtime.config import KvTransfer, LeaderDiscovery, RuntimeConfig, Topology
from ascend_runtime.roles import DP_RPC_PORT, ENGINE_HTTP_PORT, PD_ROLES, Role

from .. import images
from ..api.resource import ModelDeployment
from ..api.spec import ModelDeploymentSpec, RoleSpec
from . import fused_mc2, graphs, hccl, memory, names
from .architectures import Architecture
from .capabilities import RuntimeCapabilities
from .engine_args import RoleEngineSettings, role_environment, vllm_args
from .hardware import HardwareProfile
from .model_source import model_path
from .problems import PlanWarning, Problem
from .quantity import parse_quantity
from .results import ClusterInfo, PodPlan, RolePlan
from .sim_model import sim_settings
from .topology import PodLayout, check_context_parallel, layout_role


@dataclass
class RoleContext:
    """What every per-role step reads, and where they report."""

    md: ModelDeployment
    hw: HardwareProfile
    arch: Architecture
    caps: RuntimeCapabilities
    cluster: ClusterInfo
    kind: str
    pd: bool
    problems: list[Problem]
    warnings: list[PlanWarning]

    @property
    def spec(self) -> ModelDeploymentSpec:
        return self.md.spec


def kv_port_floor(devices_per_node: int) -> int:
    """vllm-ascend's advice: the transport takes random ports below this (28000 with 8 NPUs per
    node, 36000 with 16)."""
    return 36000 if devices_per_node > 8 else 28000


def default_kv_port(devices_per_node: int) -> int:
    """The kvPort planned when a role names none: 30000, or the floor where that is higher."""
    return max(30000, kv_port_floor(devices_per_node))


def cudagraph_mode(spec: ModelDeploymentSpec, role: RoleSpec) -> str:
    """The role's ACLGraph capture mode: its own, else spec.runtime's."""
    return role.cudagraph_mode or spec.runtime.cudagraph_mode


def graph_settings(
    ctx: RoleContext, path: str, role: RoleSpec
) -> tuple[str, tuple[int, ...] | None, bool, int | None]:
    """Graph mode, capture sizes (and whether they must be passed), speculative tokens."""
    spec, caps, pd, problems = ctx.spec, ctx.caps, ctx.pd, ctx.problems
    runtime = spec.runtime
    graph_mode = role.graph_mode or runtime.graph_mode
    if graph_mode == "torchair" and not caps.torchair:
        field_path = f"{path}.graphMode" if role.graph_mode else "spec.runtime.graphMode"
        problems.append(
            Problem(
                field_path,
                "TorchAir graph mode was removed in vllm-ascend v0.13 (#4814); this is "
                f"{caps.line}",
                "use graphMode aclgraph (or eager), or spec.runtime.version v0.11.x",
            )
        )
    n = runtime.speculative.num_speculative_tokens if runtime.speculative else None
    if n and role.name == Role.PREFILL:
        n = 1  # prefill instances of a PD deployment draft one token only
    if graph_mode == "eager":
        return graph_mode, None, False, n
    if runtime.capture_sizes:
        return graph_mode, tuple(sorted(set(runtime.capture_sizes))), True, n
    if spec.model.task == "embed":
        tokens = (
            role.max_num_batched_tokens
            or runtime.max_num_batched_tokens
            or graphs.ENCODER_MAX_CAPTURE_TOKENS
        )
        return graph_mode, tuple(graphs.encoder_capture_sizes(tokens)), True, None
    max_seqs = role.max_num_seqs or runtime.max_num_seqs or graphs.DEFAULT_MAX_NUM_SEQS
    full = graph_mode == "aclgraph" and cudagraph_mode(spec, role) != "PIECEWISE"
    if n and n + 1 > 2 and full:
        requests = max_seqs
        if pd and role.name == Role.DECODE:
            requests = graphs.consumer_request_slots(max_seqs, n + 1)
        return graph_mode, tuple(graphs.mtp_capture_sizes(requests, n + 1)), True, n
    return graph_mode, tuple(graphs.default_capture_sizes(max_seqs)), False, n


ASCEND_CONNECTOR = "AscendKvConnector"
ASCEND_CONNECTOR_MODULE = "ascend_runtime.kv.vllm_connector"


def kv_transfer(ctx: RoleContext, idx: int, role: RoleSpec) -> KvTransfer | None:
    """Mooncake settings of a PD role: port (checked), engine id prefix, both sides' sizes."""
    md, hw, problems = ctx.md, ctx.hw, ctx.problems
    spec = md.spec
    if role.name == Role.UNIFIED:
        return None
    par = role.parallelism
    span = par.data * par.tensor * par.pipeline * par.prefill_context
    floor = kv_port_floor(hw.devices_per_node)
    port = role.kv_port or default_kv_port(hw.devices_per_node)
    path = f"spec.roles[{idx}].kvPort"
    if port < floor:
        # a warning, not an error: vllm-ascend's own nightly CI runs 30000/30100 on A3 nodes
        ctx.warnings.append(
            PlanWarning(
                path,
                f"kvPort {port} is below {floor}, where vllm-ascend advises to start with "
                f"{hw.devices_per_node} NPUs per node: the transport may take random ports in "
                f"{port}-{port + span - 1} and a pod can then fail to bind",
                f"choose kvPort >= {floor} (vllm-ascend's own CI runs below it and works)",
            )
        )
    if port + span - 1 > 65535:
        problems.append(
            Problem(
                path,
                f"kvPort {port} + {span} ports (data x tensor x pipeline x prefillContext) passes "
                "65535",
                f"choose kvPort <= {65535 - span + 1}",
            )
        )
    roles = {r.name: r.parallelism for r in spec.roles}
    kv_role = "kv_producer" if role.name == Role.PREFILL else "kv_consumer"
    prefix = f"{md.metadata.name}-{role.name}"
    if spec.runtime.kv_connector == "ascend-serve":
        return KvTransfer(
            connector=ASCEND_CONNECTOR,
            module_path=ASCEND_CONNECTOR_MODULE,
            kv_role=kv_role,
            kv_port=port,
            engine_id_prefix=prefix,
            extra_config={"transport": "mooncake", "kv_layout": "cross_layer"},
        )
    extra: dict[str, Any] = {"use_ascend_direct": True}
    for name in PD_ROLES:
        if name in roles:
            extra[name] = {"dp_size": roles[name].data, "tp_size": roles[name].tensor}
    return KvTransfer(kv_role=kv_role, kv_port=port, engine_id_prefix=prefix, extra_config=extra)


def pod_kv_ports(
    kv: KvTransfer | None, pod: PodLayout, ranks_devices: int
) -> tuple[int, int] | None:
    """side = kv_port + dp_rank x TP x PP x PCP; handshakes add up to ranks_devices - 1."""
    if kv is None:
        return None
    first = kv.kv_port + pod.dp_ranks[0] * ranks_devices
    last = kv.kv_port + pod.dp_ranks[-1] * ranks_devices + ranks_devices - 1
    return first, last


def plan_role(ctx: RoleContext, idx: int, role: RoleSpec) -> RolePlan | None:
    md, hw, arch, caps, cluster = ctx.md, ctx.hw, ctx.arch, ctx.caps, ctx.cluster
    kind, pd, problems, warnings = ctx.kind, ctx.pd, ctx.problems, ctx.warnings
    spec = md.spec
    path = f"spec.roles[{idx}]"
    par = role.parallelism
    if par.expert and arch.num_experts == 0:
        problems.append(
            Problem(
                f"{path}.parallelism.expert",
                "expert parallelism is on, but the model's architecture has no experts",
                "set expert: false for a dense model, or fix spec.model.architecture",
            )
        )
    check_context_parallel(path, par, arch, caps, problems)
    if (
        (par.prefill_context > 1 or par.decode_context > 1)
        and pd
        and spec.runtime.block_size != 128
    ):
        problems.append(
            Problem(
                "spec.runtime.blockSize",
                f"context parallelism with PD needs the KV interleave to equal the block size 128; "
                f"blockSize is {spec.runtime.block_size}",
                "set blockSize: 128",
            )
        )
    if pd and spec.runtime.kv_offload is not None:
        problems.append(
            Problem(
                "spec.runtime.kvOffload",
                "host KV offload together with PD disaggregation is not supported by this release",
                "remove kvOffload, or use a unified role",
            )
        )
    layout = layout_role(path, par, hw, problems)
    graph_mode, capture, explicit, n_spec = graph_settings(ctx, path, role)
    if capture and caps.graph_limit == "error" and len(capture) > 128:
        warnings.append(
            PlanWarning(
                "spec.runtime.captureSizes",
                f"{role.name}: {len(capture)} capture sizes; vllm-ascend {caps.line} raises an "
                "error when graphs exceed the stream budget",
                "capture fewer sizes",
            )
        )
    max_num_seqs = role.max_num_seqs or spec.runtime.max_num_seqs
    max_batched = role.max_num_batched_tokens or spec.runtime.max_num_batched_tokens
    mc2_fallback = fused_mc2.fallback(spec, role, arch, hw)
    if mc2_fallback is not None:
        warnings.append(
            PlanWarning("spec.runtime.fusedMc2", f"{role.name}: {mc2_fallback[0]}", mc2_fallback[1])
        )
    buffer_mb = hccl.plan_buffer(
        spec, arch, hw, problems, path=path, role=role, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_batched,
    )  # fmt: skip
    kv = kv_transfer(ctx, idx, role) if pd else None
    mem = None
    if spec.runtime.engine == "vllm" and spec.hardware is not None:
        mem = memory.budget(spec, role, arch, hw, buffer_mb)
        verdict = mem and memory.check(mem, path, spec.model.max_model_len or 0)
        if verdict:
            message, fix, error = verdict
            report = Problem if error else PlanWarning
            (problems if error else warnings).append(report(f"{path}.parallelism", message, fix))
    if layout is None:
        return None
    offload = 0
    if spec.runtime.kv_offload is not None:
        try:
            offload = int(parse_quantity(spec.runtime.kv_offload.cpu_bytes))
        except ValueError:
            offload = 0
    settings = RoleEngineSettings(
        graph_mode=graph_mode,
        cudagraph_mode=cudagraph_mode(spec, role),
        capture_sizes=capture if explicit else None,
        num_speculative_tokens=n_spec,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_batched,
        hccl_buffer_mb=buffer_mb,
        offload_cpu_bytes=offload,
    )
    engine_args = vllm_args(
        spec, role, settings, arch=arch, caps=caps, http_port=ENGINE_HTTP_PORT, pd=pd
    )
    if spec.model.source.hugging_face and spec.model.source.hugging_face.revision:
        engine_args = [*engine_args, "--revision", spec.model.source.hugging_face.revision]
    name, namespace = md.metadata.name, md.metadata.namespace
    workload = names.role_workload(name, role.name)
    instances = (
        (role.replicas if role.replicas is not None else 1)
        if role.name == Role.PREFILL
        else spec.replicas
    )
    runtime_config = RuntimeConfig(
        deployment=name,
        namespace=namespace,
        role=role.name,
        engine=spec.runtime.engine,
        runtime_version=spec.runtime.version,
        model_path=model_path(spec),
        served_model_name=spec.model.name,
        task=spec.model.task,
        http_port=ENGINE_HTTP_PORT,
        engine_args=engine_args if spec.runtime.engine == "vllm" else [],
        env=role_environment(spec, role, settings, arch),
        topology=Topology(
            pods_per_instance=layout.pods_per_instance,
            devices_per_pod=layout.devices_per_pod if hw.resource_name else 0,
            tensor=par.tensor,
            pipeline=par.pipeline,
            data=par.data,
            data_local=layout.data_local,
            prefill_context=par.prefill_context,
            decode_context=par.decode_context,
            expert=par.expert,
            data_parallel_rpc_port=DP_RPC_PORT,
        ),
        kv_transfer=kv,
        leader=LeaderDiscovery(
            workload=kind,  # type: ignore[arg-type]
            namespace=namespace,
            headless_service=workload if kind == "StatefulSet" else None,
            wait_seconds=spec.workload.leader_wait_seconds,
        ),
        max_model_len=spec.model.max_model_len,
        seed=spec.runtime.seed,
        sim=sim_settings(spec, role, arch, hw),
    )
    if spec.runtime.image:
        image = spec.runtime.image
    elif spec.runtime.engine == "sim":
        image = images.cpu_runtime_image(cluster.image_registry)
    else:
        image = images.npu_runtime_image(
            spec.runtime.version,
            spec.hardware.profile if spec.hardware else "A2",
            cluster.image_registry,
        )
    pods = tuple(
        PodPlan(
            worker_index=p.worker_index,
            dp_ranks=p.dp_ranks,
            devices=p.devices,
            leader=p.leader,
            kv_ports=pod_kv_ports(kv, p, layout.ranks_devices),
        )
        for p in layout.pods
    )
    return RolePlan(
        name=role.name,
        instances=instances,
        pods_per_instance=layout.pods_per_instance,
        devices_per_pod=layout.devices_per_pod,
        ranks_devices=layout.ranks_devices,
        graph_mode=graph_mode,
        capture_sizes=capture,
        capture_sizes_explicit=explicit,
        num_speculative_tokens=n_spec,
        hccl_buffer_mb=buffer_mb if spec.runtime.engine == "vllm" else None,
        pods=pods,
        runtime_config=runtime_config,
        image=image,
        workload_name=workload,
        service_name=names.role_service(name, role.name),
        configmap_name=names.runtime_configmap(name, role.name),
        memory=mem,
    )
