"""The planner: a validated ModelDeployment -> Plan (pure: no I/O, no cluster).

Every problem is collected and reported at once, each naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ascend_runtime.config import (
    KvTransfer,
    LeaderDiscovery,
    RouterBackends,
    RouterConfig,
    RuntimeConfig,
    Topology,
)

from .. import images
from ..api.crd import MAX_NAME_LENGTH, structural_schema
from ..api.resource import ModelDeployment
from ..api.spec import ModelDeploymentSpec, RoleSpec
from . import graphs, hccl, names
from .architectures import Architecture, resolve_architecture
from .capabilities import RuntimeCapabilities, capabilities_for, supported_lines
from .engine_args import RoleEngineSettings, role_environment, vllm_args
from .hardware import HardwareProfile, resolve_profile
from .problems import PlanError, Problem, problems_from_validation
from .quantity import parse_quantity
from .sim_model import sim_settings
from .topology import PodLayout, check_context_parallel, layout_role

HTTP_PORT = 8000
DP_RPC_PORT = 13389
MODEL_MOUNT = "/models"


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
    warnings: tuple[str, ...] = field(default=())

    @property
    def pd(self) -> bool:
        return any(r.name == "prefill" for r in self.roles)

    @property
    def total_devices(self) -> int:
        """NPU devices requested from the cluster (0 for sim runs without spec.hardware)."""
        if self.hardware.resource_name is None:
            return 0
        return sum(r.total_devices for r in self.roles)

    def role(self, name: str) -> RolePlan:
        return next(r for r in self.roles if r.name == name)


@dataclass
class _Context:
    """What every per-role step reads, and where they report."""

    md: ModelDeployment
    hw: HardwareProfile
    arch: Architecture
    caps: RuntimeCapabilities
    cluster: ClusterInfo
    kind: str
    pd: bool
    problems: list[Problem]
    warnings: list[str]

    @property
    def spec(self) -> ModelDeploymentSpec:
        return self.md.spec


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

    _check_metadata(name, problems)
    _check_structure(spec, problems)
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
    _check_model(spec, arch, caps, problems)
    _check_quantities(spec, problems)
    warnings: list[str] = []

    kind, fallback = _workload_kind(
        spec.workload.kind, cluster.lws_available, cluster.recorded_workload
    )
    pd = any(r.name == "prefill" for r in spec.roles)
    ctx = _Context(md, hw, arch, caps, cluster, kind, pd, problems, warnings)
    role_plans = []
    for idx, role in enumerate(spec.roles):
        planned = _plan_role(ctx, idx, role)
        if planned is not None:
            role_plans.append(planned)
    if problems:
        raise PlanError(problems)

    role_order = {"prefill": 0, "decode": 1, "unified": 0}
    role_plans.sort(key=lambda r: role_order[r.name])
    scaled = "decode" if pd else "unified"
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
        router=_plan_router(md, pd, cluster),
        scaled_role=scaled,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- checks


def _workload_kind(requested: str, lws_available: bool, recorded: str | None) -> tuple[str, bool]:
    """(kind, whether `auto` runs StatefulSets). `auto` keeps the kind a deployment already
    runs as: a LeaderWorkerSet CRD installed or removed later never migrates instances."""
    if requested != "auto":
        return requested, False
    if recorded in ("LeaderWorkerSet", "StatefulSet"):
        return recorded, recorded == "StatefulSet"
    return ("LeaderWorkerSet", False) if lws_available else ("StatefulSet", True)


def _check_metadata(name: str, problems: list[Problem]) -> None:
    if len(name) > MAX_NAME_LENGTH:
        problems.append(
            Problem(
                "metadata.name",
                f"{name!r} has {len(name)} characters; child names would pass Kubernetes' "
                "63-character limit",
                f"use a name of at most {MAX_NAME_LENGTH} characters",
            )
        )
    if not name.replace("-", "a").isalnum() or not name[0].isalnum() or name != name.lower():
        problems.append(
            Problem(
                "metadata.name",
                f"{name!r} is not a DNS label",
                "use lowercase letters, digits and '-', starting and ending with a letter or digit",
            )
        )


def _check_structure(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    """The cross-field rules the CRD's CEL also enforces (for runs without an API server)."""
    source = spec.model.source
    set_sources = [
        n
        for n, v in (
            ("pvc", source.pvc),
            ("hostPath", source.host_path),
            ("huggingFace", source.hugging_face),
        )
        if v is not None
    ]
    if len(set_sources) != 1:
        problems.append(
            Problem(
                "spec.model.source",
                "no model source is set"
                if not set_sources
                else f"{len(set_sources)} sources are set ({', '.join(set_sources)})",
                "set exactly one of pvc, hostPath or huggingFace",
            )
        )
    hf = source.hugging_face
    if hf is not None and (hf.cache.claim_name is None) == (hf.cache.host_path is None):
        problems.append(
            Problem(
                "spec.model.source.huggingFace.cache",
                "the cache needs exactly one of claimName or hostPath",
                "set claimName (a PVC with the HF cache) or hostPath (a node directory)",
            )
        )
    names_ = [r.name for r in spec.roles]
    if len(set(names_)) != len(names_):
        problems.append(Problem("spec.roles", f"roles repeat: {names_}", "list each role once"))
    elif "unified" in names_ and len(names_) > 1:
        problems.append(
            Problem(
                "spec.roles",
                f"unified is combined with {[n for n in names_ if n != 'unified']}",
                "use one unified role, or a prefill and a decode role",
            )
        )
    elif "unified" not in names_ and set(names_) != {"prefill", "decode"}:
        missing = {"prefill", "decode"} - set(names_)
        problems.append(
            Problem(
                "spec.roles",
                f"PD disaggregation needs both prefill and decode; {missing} is missing",
                "add the missing role, or use one unified role",
            )
        )
    by_name = {r.name: (i, r) for i, r in enumerate(spec.roles)}
    for i, role in enumerate(spec.roles):
        if role.name != "prefill" and role.replicas is not None:
            problems.append(
                Problem(
                    f"spec.roles[{i}].replicas",
                    f"replicas is set on the {role.name} role",
                    "set the unified or decode instance count in spec.replicas (what kubectl "
                    "scale changes); roles[].replicas is for prefill only",
                )
            )
    if "prefill" in by_name and "decode" in by_name:
        pi, prefill = by_name["prefill"]
        _, decode = by_name["decode"]
        if prefill.parallelism.tensor < decode.parallelism.tensor:
            problems.append(
                Problem(
                    f"spec.roles[{pi}].parallelism.tensor",
                    f"prefill tensor {prefill.parallelism.tensor} is below decode tensor "
                    f"{decode.parallelism.tensor}; Mooncake needs prefill TP >= decode TP",
                    f"raise prefill tensor to at least {decode.parallelism.tensor}, or lower "
                    "decode tensor",
                )
            )
    if spec.runtime.engine == "vllm" and spec.hardware is None:
        problems.append(
            Problem(
                "spec.hardware",
                "engine vllm needs NPU nodes, and spec.hardware is not set",
                "set spec.hardware.profile (A2 or A3), or use spec.runtime.engine: sim",
            )
        )
    if spec.model.task == "embed":
        _check_embed(spec, problems)


def _check_embed(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    """An embedding model only encodes: no prefill/decode split, no drafting, no decode
    graphs, no KV reuse across requests."""
    for i, role in enumerate(spec.roles):
        if role.name != "unified":
            problems.append(
                Problem(
                    f"spec.roles[{i}].name",
                    f"task: embed has no {role.name} role: an embedding model only runs "
                    "prefill-like encoder passes, so prefill/decode disaggregation does not apply",
                    "use one role named unified",
                )
            )
    runtime = spec.runtime
    if runtime.speculative is not None:
        problems.append(
            Problem(
                "spec.runtime.speculative",
                "speculative decoding (MTP) drafts output tokens, and an embedding model "
                "generates none",
                "remove spec.runtime.speculative",
            )
        )
    if runtime.kv_offload is not None:
        problems.append(
            Problem(
                "spec.runtime.kvOffload",
                "KV offload keeps KV blocks for later requests; an embedding pass keeps none",
                "remove spec.runtime.kvOffload",
            )
        )
    limit = spec.model.max_model_len
    for i, role in enumerate(spec.roles):
        budget = role.max_num_batched_tokens or runtime.max_num_batched_tokens
        if limit and budget and budget < limit:
            field_path = (
                f"spec.roles[{i}].maxNumBatchedTokens"
                if role.max_num_batched_tokens
                else "spec.runtime.maxNumBatchedTokens"
            )
            problems.append(
                Problem(
                    field_path,
                    f"{budget} tokens per batch is below maxModelLen {limit}: an embedding "
                    "input is encoded in one pass (no chunked prefill), so a full-length input "
                    "could never be scheduled",
                    f"raise it to at least {limit}, or lower spec.model.maxModelLen",
                )
            )
    modes = {role.graph_mode or runtime.graph_mode for role in spec.roles}
    if "aclgraph" in modes and runtime.cudagraph_mode != "PIECEWISE":
        problems.append(
            Problem(
                "spec.runtime.cudagraphMode",
                f"{runtime.cudagraph_mode} captures decode batches, and an embedding model "
                "never decodes",
                "set spec.runtime.cudagraphMode: PIECEWISE (graphs over encoder batch token "
                "counts), or graphMode: eager",
            )
        )
    if "torchair" in modes:
        problems.append(
            Problem(
                "spec.runtime.graphMode",
                "TorchAir graph mode covers decoder models only",
                "use graphMode aclgraph with cudagraphMode PIECEWISE, or eager",
            )
        )


def _check_model(
    spec: ModelDeploymentSpec,
    arch: Architecture,
    caps: RuntimeCapabilities,
    problems: list[Problem],
) -> None:
    model, runtime = spec.model, spec.runtime
    preset = model.architecture.preset
    if preset is not None:
        from .architectures import PRESETS

        if preset not in PRESETS:
            problems.append(
                Problem(
                    "spec.model.architecture.preset",
                    f"unknown preset {preset!r}",
                    f"use one of {sorted(PRESETS)}, or leave preset out and set the fields",
                )
            )
    rope = model.rope_scaling
    if rope is not None and model.max_model_len:
        limit = int(rope.factor * rope.original_max_position_embeddings)
        if model.max_model_len > limit:
            problems.append(
                Problem(
                    "spec.model.maxModelLen",
                    f"{model.max_model_len} exceeds what rope scaling reaches: factor "
                    f"{rope.factor:g} x {rope.original_max_position_embeddings} = {limit}",
                    f"lower maxModelLen to {limit} or raise ropeScaling.factor",
                )
            )
    spec_dec = runtime.speculative
    if spec_dec is not None:
        if arch.mtp_layers == 0:
            problems.append(
                Problem(
                    "spec.runtime.speculative",
                    "MTP needs weights with MTP layers, and the model's architecture has none",
                    "remove spec.runtime.speculative, or set architecture.mtpLayers if the "
                    "weights do carry MTP layers",
                )
            )
        full = runtime.graph_mode == "aclgraph" and runtime.cudagraph_mode != "PIECEWISE"
        if spec_dec.disable_padded_drafter_batch and (full or runtime.async_scheduling):
            problems.append(
                Problem(
                    "spec.runtime.speculative.disablePaddedDrafterBatch",
                    "an unpadded drafter batch is rejected with full graphs and with async "
                    "scheduling",
                    "set disablePaddedDrafterBatch: false, or use asyncScheduling: false with "
                    "graphMode eager or cudagraphMode PIECEWISE",
                )
            )
        n1 = spec_dec.num_speculative_tokens + 1
        if runtime.capture_sizes and n1 > 2 and full:
            bad = [s for s in runtime.capture_sizes if s % n1]
            if bad:
                problems.append(
                    Problem(
                        "spec.runtime.captureSizes",
                        f"with full graphs and {n1 - 1} speculative tokens every capture size must "
                        f"be a multiple of {n1}; {bad} are not",
                        f"use multiples of {n1} (e.g. {[n1 * k for k in (1, 2, 4, 8)]}), or leave "
                        "captureSizes out to get them planned",
                    )
                )
    if runtime.fused_mc2:
        if not caps.fused_mc2:
            problems.append(
                Problem(
                    "spec.runtime.fusedMc2",
                    f"fused MC2 is not available in vllm-ascend {caps.line}",
                    "set fusedMc2: false, or run v0.13.x or later",
                )
            )
        if model.quantization not in ("w8a8", "w8a8-dynamic"):
            problems.append(
                Problem(
                    "spec.runtime.fusedMc2",
                    f"fused MC2 (dispatch_ffn_combine) needs W8A8 weights; quantization is "
                    f"{model.quantization}",
                    "set spec.model.quantization: w8a8 (msModelSlim weights), or fusedMc2: false",
                )
            )
        if spec_dec is not None:
            problems.append(
                Problem(
                    "spec.runtime.fusedMc2",
                    "fused MC2 does not support MTP speculative decoding",
                    "remove spec.runtime.speculative, or set fusedMc2: false",
                )
            )
        if not arch.is_moe:
            problems.append(
                Problem(
                    "spec.runtime.fusedMc2",
                    "fused MC2 applies to MoE models, and this one has "
                    "no experts (architecture.numExperts)",
                    "set fusedMc2: false, or describe the architecture (preset or numExperts)",
                )
            )
    if runtime.kv_offload is not None and not caps.kv_offload:
        problems.append(
            Problem(
                "spec.runtime.kvOffload",
                f"KV offload with cpu_bytes_to_use needs vLLM 0.23 (vllm-ascend v0.23); this is "
                f"{caps.line}",
                "remove kvOffload, or use spec.runtime.version v0.23.x",
            )
        )


def _check_quantities(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    checks: list[tuple[str, str]] = []
    if spec.hardware is not None:
        checks.append(("spec.hardware.shmSize", spec.hardware.shm_size))
    if spec.runtime.kv_offload is not None:
        checks.append(("spec.runtime.kvOffload.cpuBytes", spec.runtime.kv_offload.cpu_bytes))
    for i, role in enumerate(spec.roles):
        if role.resources:
            for kind in ("requests", "limits"):
                for key, value in getattr(role.resources, kind).items():
                    checks.append((f"spec.roles[{i}].resources.{kind}.{key}", value))
    if spec.router.resources:
        for kind in ("requests", "limits"):
            for key, value in getattr(spec.router.resources, kind).items():
                checks.append((f"spec.router.resources.{kind}.{key}", value))
    for path, value in checks:
        try:
            parse_quantity(value)
        except ValueError as exc:
            problems.append(Problem(path, str(exc), "write a quantity such as 64Gi, 500m or 8"))


# --------------------------------------------------------------------------- one role


def _kv_port_minimum(devices_per_node: int) -> int:
    """The transport takes random ports below these (vllm-ascend's guidance)."""
    return 36000 if devices_per_node > 8 else 28000


def _graph_settings(
    ctx: _Context, path: str, role: RoleSpec
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
    if n and role.name == "prefill":
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
    full = graph_mode == "aclgraph" and runtime.cudagraph_mode != "PIECEWISE"
    if n and n + 1 > 2 and full:
        requests = max_seqs
        if pd and role.name == "decode":
            requests = graphs.consumer_request_slots(max_seqs, n + 1)
        return graph_mode, tuple(graphs.mtp_capture_sizes(requests, n + 1)), True, n
    return graph_mode, tuple(graphs.default_capture_sizes(max_seqs)), False, n


def _hccl_buffer(
    ctx: _Context,
    path: str,
    role: RoleSpec,
    max_num_seqs: int | None,
    max_num_batched_tokens: int | None,
) -> int:
    """HCCL_BUFFSIZE in MB: the user's (checked against fused MC2), or planned."""
    spec, arch, problems = ctx.spec, ctx.arch, ctx.problems
    runtime = spec.runtime
    explicit = role.hccl_buffer_size_mb or runtime.hccl_buffer_size_mb
    field_path = (
        f"{path}.hcclBufferSizeMb" if role.hccl_buffer_size_mb else "spec.runtime.hcclBufferSizeMb"
    )
    base = (
        hccl.MOE_EP_DEFAULT_MB
        if (arch.is_moe and role.parallelism.expert)
        else (hccl.HCCL_DEFAULT_MB)
    )
    if not runtime.fused_mc2:
        return explicit or base
    par = role.parallelism
    ep = par.tensor * par.data
    if not par.expert:
        problems.append(
            Problem(
                f"{path}.parallelism.expert",
                "fused MC2 runs the MoE layers expert-parallel",
                "set parallelism.expert: true, or spec.runtime.fusedMc2: false",
            )
        )
    elif ep > hccl.FUSED_MC2_MAX_EP:
        problems.append(
            Problem(
                f"{path}.parallelism",
                f"fused MC2 supports at most {hccl.FUSED_MC2_MAX_EP} expert-parallel ranks; tensor "
                f"{par.tensor} x data {par.data} = {ep}",
                f"keep tensor x data <= {hccl.FUSED_MC2_MAX_EP}, or set "
                "spec.runtime.fusedMc2: false",
            )
        )
    tokens_field = "maxNumSeqs" if role.name == "decode" else "maxNumBatchedTokens"
    tokens = max_num_seqs if role.name == "decode" else max_num_batched_tokens
    if not tokens:
        problems.append(
            Problem(
                f"{path}.{tokens_field}",
                f"fused MC2 sizes HCCL_BUFFSIZE from the tokens per step, and {tokens_field} is "
                "not set",
                f"set spec.runtime.{tokens_field} (or on the role)",
            )
        )
        return explicit or base
    if not (arch.hidden_size and arch.experts_per_token):
        problems.append(
            Problem(
                "spec.model.architecture",
                "fused MC2 sizing needs hiddenSize and expertsPerToken",
                "name a preset (e.g. qwen3-235b-a22b) or set hiddenSize and expertsPerToken",
            )
        )
        return explicit or base
    need = hccl.fused_mc2_required_mb(tokens, arch.experts_per_token, arch.hidden_size)
    if explicit is None:
        return max(base, need)
    if explicit < need:
        fit = hccl.fused_mc2_max_tokens(explicit, arch.experts_per_token, arch.hidden_size)
        problems.append(
            Problem(
                field_path,
                f"HCCL_BUFFSIZE {explicit} MB is {need - explicit} MB short of what fused MC2 "
                "needs: "
                f"{tokens} tokens x top-{arch.experts_per_token} x hidden {arch.hidden_size} x 3 B "
                f"+ {hccl.FUSED_MC2_OVERHEAD_MB} MB = {need} MB",
                f"raise it to at least {need}, or lower {tokens_field} to at most {fit}",
            )
        )
    return explicit


def _model_path(spec: ModelDeploymentSpec) -> str:
    source = spec.model.source
    if source.pvc is not None:
        sub = source.pvc.path.strip("/")
        return f"{MODEL_MOUNT}/{sub}" if sub else MODEL_MOUNT
    if source.hugging_face is not None:
        return source.hugging_face.id
    return MODEL_MOUNT  # hostPath (or no source, already reported as a problem)


ASCEND_CONNECTOR = "AscendKvConnector"
ASCEND_CONNECTOR_MODULE = "ascend_runtime.kv.vllm_connector"


def _kv_transfer(ctx: _Context, idx: int, role: RoleSpec) -> KvTransfer | None:
    """Mooncake settings of a PD role: port (checked), engine id prefix, both sides' sizes."""
    md, hw, problems = ctx.md, ctx.hw, ctx.problems
    spec = md.spec
    if role.name == "unified":
        return None
    minimum = _kv_port_minimum(hw.devices_per_node)
    port = role.kv_port or (30000 if hw.devices_per_node <= 8 else 36000)
    path = f"spec.roles[{idx}].kvPort"
    if port < minimum:
        problems.append(
            Problem(
                path,
                f"kvPort {port} is below {minimum}: with {hw.devices_per_node} NPUs per node the "
                "transport takes random ports below that",
                f"choose kvPort >= {minimum}",
            )
        )
    par = role.parallelism
    span = par.data * par.tensor * par.pipeline * par.prefill_context
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
    kv_role = "kv_producer" if role.name == "prefill" else "kv_consumer"
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
    for name in ("prefill", "decode"):
        if name in roles:
            extra[name] = {"dp_size": roles[name].data, "tp_size": roles[name].tensor}
    return KvTransfer(kv_role=kv_role, kv_port=port, engine_id_prefix=prefix, extra_config=extra)


def _pod_kv_ports(
    kv: KvTransfer | None, pod: PodLayout, ranks_devices: int
) -> tuple[int, int] | None:
    """side = kv_port + dp_rank x TP x PP x PCP; handshakes add up to ranks_devices - 1."""
    if kv is None:
        return None
    first = kv.kv_port + pod.dp_ranks[0] * ranks_devices
    last = kv.kv_port + pod.dp_ranks[-1] * ranks_devices + ranks_devices - 1
    return first, last


def _plan_role(ctx: _Context, idx: int, role: RoleSpec) -> RolePlan | None:
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
    graph_mode, capture, explicit, n_spec = _graph_settings(ctx, path, role)
    if capture and caps.graph_limit == "error" and len(capture) > 128:
        warnings.append(
            f"{role.name}: {len(capture)} capture sizes; vllm-ascend {caps.line} raises an error "
            "when graphs exceed the stream budget. Consider fewer captureSizes."
        )
    max_num_seqs = role.max_num_seqs or spec.runtime.max_num_seqs
    max_batched = role.max_num_batched_tokens or spec.runtime.max_num_batched_tokens
    buffer_mb = _hccl_buffer(ctx, path, role, max_num_seqs, max_batched)
    kv = _kv_transfer(ctx, idx, role) if pd else None
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
        capture_sizes=capture if explicit else None,
        num_speculative_tokens=n_spec,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_batched,
        hccl_buffer_mb=buffer_mb,
        offload_cpu_bytes=offload,
    )
    engine_args = vllm_args(spec, role, settings, arch=arch, caps=caps, http_port=HTTP_PORT, pd=pd)
    if spec.model.source.hugging_face and spec.model.source.hugging_face.revision:
        engine_args = [*engine_args, "--revision", spec.model.source.hugging_face.revision]
    name, namespace = md.metadata.name, md.metadata.namespace
    workload = names.role_workload(name, role.name)
    instances = (
        (role.replicas if role.replicas is not None else 1)
        if role.name == "prefill"
        else spec.replicas
    )
    runtime_config = RuntimeConfig(
        deployment=name,
        namespace=namespace,
        role=role.name,
        engine=spec.runtime.engine,
        runtime_version=spec.runtime.version,
        model_path=_model_path(spec),
        served_model_name=spec.model.name,
        task=spec.model.task,
        http_port=HTTP_PORT,
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
            kv_ports=_pod_kv_ports(kv, p, layout.ranks_devices),
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
    )


def _plan_router(md: ModelDeployment, pd: bool, cluster: ClusterInfo) -> RouterPlan:
    spec, name, namespace = md.spec, md.metadata.name, md.metadata.namespace
    router = spec.router
    roles = [r.name for r in spec.roles]
    config = RouterConfig(
        deployment=name,
        served_model_name=spec.model.name,
        mode="pd" if pd else "unified",
        port=router.port,
        policy=router.policy,
        backends=RouterBackends(
            source="kubernetes",
            namespace=namespace,
            services={role: names.role_service(name, role) for role in roles},
            engine_port=HTTP_PORT,
        ),
        api_keys_file=names.router_keys_file("api-keys") if router.api_keys_secret else None,
        admin_keys_file=names.router_keys_file("admin-keys") if router.admin_keys_secret else None,
        max_request_bytes=router.max_request_bytes,
        max_concurrent_requests=router.max_concurrent_requests,
        request_timeout_seconds=router.request_timeout_seconds,
        first_token_timeout_seconds=router.first_token_timeout_seconds,
        inter_token_timeout_seconds=router.inter_token_timeout_seconds,
        body_timeout_seconds=router.body_timeout_seconds,
        prefill_retries=router.prefill_retries,
        max_model_len=spec.model.max_model_len,
    )
    service = names.router_service(name)
    return RouterPlan(
        name=names.router(name),
        service_name=service,
        replicas=router.replicas,
        image=router.image or images.cpu_runtime_image(cluster.image_registry),
        config=config,
        endpoint=f"http://{service}.{namespace}.svc:{router.port}",
    )
