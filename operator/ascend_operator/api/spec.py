"""ModelDeployment spec: the single source of truth for the CRD schema and the planner's input.

Field docstrings become `kubectl explain` text; keep them short, concrete, and user-facing.
Shape and range rules live here (the API server and pydantic both enforce them); cross-field
rules the API server can check are CEL rules attached to the models; everything that needs the
capability table or arithmetic over the whole deployment lives in the planner.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, JsonValue, WithJsonSchema

from ascend_runtime.roles import ROUTER_PORT, KvAwareMode, RoleName, RouterPolicy

from .base import ApiModel, Quantity, cel, cel_rules

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


# --------------------------------------------------------------------------- model


class PvcSource(ApiModel):
    """Weights on a PersistentVolumeClaim in the deployment's namespace."""

    claim_name: str = Field(min_length=1, max_length=253, pattern=NAME_PATTERN)
    """Name of the PersistentVolumeClaim."""
    path: str = Field(default="", max_length=1024)
    """Directory of the model inside the claim (empty: the claim's root)."""


class HostPathSource(ApiModel):
    """Weights in a directory present on every node that runs the model (for example a shared
    filesystem mount)."""

    path: str = Field(min_length=1, max_length=1024, pattern=r"^/")
    """Absolute path of the model directory on the node."""


class HfCache(ApiModel):
    """Where a Hugging Face cache (HF_HOME layout) already holds the model."""

    claim_name: str | None = Field(default=None, max_length=253, pattern=NAME_PATTERN)
    """PersistentVolumeClaim holding the cache."""
    host_path: str | None = Field(default=None, max_length=1024, pattern=r"^/")
    """Absolute node path of the cache."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel(
                "has(self.claimName) != has(self.hostPath)",
                "set exactly one of claimName or hostPath",
            )
        )
    }


class HuggingFaceSource(ApiModel):
    """A Hugging Face model id resolved from a local cache; pods run with HF_HUB_OFFLINE=1 and
    never download."""

    id: str = Field(min_length=1, max_length=256, pattern=r"^[\w.-]+/[\w.-]+$")
    """Repository id, for example `Qwen/Qwen3-235B-A22B`."""
    revision: str | None = Field(default=None, max_length=128)
    """Revision (branch, tag or commit) inside the cache; the cache's default when unset."""
    cache: HfCache
    """The volume that holds the cache."""


class ModelSource(ApiModel):
    """Where the weights come from. Set exactly one of pvc, hostPath, huggingFace."""

    pvc: PvcSource | None = None
    """Weights on a PersistentVolumeClaim."""
    host_path: HostPathSource | None = None
    """Weights in a node directory."""
    hugging_face: HuggingFaceSource | None = None
    """A Hugging Face id resolved from a local cache."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel(
                "[has(self.pvc), has(self.hostPath), has(self.huggingFace)]"
                ".filter(x, x).size() == 1",
                "set exactly one model source: pvc, hostPath or huggingFace",
            )
        )
    }


class RopeScaling(ApiModel):
    """Rope scaling to extend the context window (YaRN), for example 4 x 32768 = 131072 tokens
    for Qwen3-235B-A22B. Not needed for weights that ship with long context (-2507)."""

    type: Literal["yarn"] = "yarn"
    """Scaling method."""
    factor: float = Field(gt=1.0, le=64.0)
    """Context extension factor."""
    original_max_position_embeddings: int = Field(ge=1024, le=1_048_576)
    """The model's native context length."""
    rope_theta: float | None = Field(default=None, gt=0)
    """Rope base frequency; the model's own value when unset (1000000 for Qwen3)."""


class ModelArchitecture(ApiModel):
    """Facts about the network that the planner needs to size buffers and the sim engine needs
    for its latency model. Name a preset, and override any field."""

    preset: str | None = Field(default=None, max_length=64)
    """Known architecture to start from: see `ascend-serve presets` (qwen3-235b-a22b,
    qwen3-30b-a3b, qwen3-8b, deepseek-v3, tiny)."""
    hidden_size: int | None = Field(default=None, ge=1)
    """Hidden size (4096 for Qwen3-235B-A22B)."""
    num_layers: int | None = Field(default=None, ge=1)
    """Number of transformer layers."""
    num_attention_heads: int | None = Field(default=None, ge=1)
    """Attention (query) heads; vLLM needs the tensor-parallel size to divide them."""
    num_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (GQA). Not used for MLA models."""
    head_dim: int | None = Field(default=None, ge=1)
    """Attention head dimension."""
    num_experts: int | None = Field(default=None, ge=0)
    """Routed experts per MoE layer (0 for dense models)."""
    experts_per_token: int | None = Field(default=None, ge=1)
    """Experts each token is routed to (top-k)."""
    total_params_b: float | None = Field(default=None, gt=0)
    """Total parameters, in billions."""
    active_params_b: float | None = Field(default=None, gt=0)
    """Parameters active per token, in billions (equal to total for dense models)."""
    mla: bool | None = None
    """Multi-head latent attention (DeepSeek-style): K and V cache rows differ in size."""
    mtp_layers: int | None = Field(default=None, ge=0)
    """Multi-token-prediction layers shipped with the weights (needed for MTP decoding)."""


class ModelSpec(ApiModel):
    """The model to serve."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][\w./:-]*$")
    """Served model name: what clients put in the request's `model` field."""
    task: Literal["generate", "embed"] = "generate"
    """`generate` for chat/completions models, `embed` for embedding models (bge-m3 class)."""
    source: ModelSource
    """Where the weights come from."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Activation and weight dtype for unquantized layers (`float32` for exact comparisons
    with tiny models; NPU serving uses bfloat16)."""
    quantization: Literal["none", "w8a8", "w8a8-dynamic", "w4a8"] = "none"
    """Weight quantization produced by msModelSlim (served with `--quantization ascend`)."""
    max_model_len: int | None = Field(default=None, ge=16, le=4_194_304)
    """Maximum context length in tokens (prompt + output); the model's own when unset."""
    rope_scaling: RopeScaling | None = None
    """Rope scaling (YaRN) for a context longer than the model's native one."""
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run."""
    architecture: ModelArchitecture = Field(default_factory=ModelArchitecture)
    """Network facts for buffer sizing and the sim engine's latency model."""


# --------------------------------------------------------------------------- runtime


class SpeculativeDecoding(ApiModel):
    """Speculative decoding: multi-token prediction (MTP, models with MTP layers) or an Eagle3
    draft model."""

    method: Literal["mtp", "eagle3"] = "mtp"
    """`mtp` drafts with the model's own MTP layers; `eagle3` with the weights in
    `draftModel`."""
    draft_model: str | None = Field(
        default=None, min_length=1, max_length=1024, pattern=r"^[\w.-][\w./-]*$"
    )
    """Eagle3 draft weights: a path relative to the model volume's root (the PVC's root, or
    the hostPath directory), or a Hugging Face id with a huggingFace source."""
    num_speculative_tokens: int = Field(ge=1, le=15)
    """Draft tokens per step (N); N + 1 must not exceed 16."""
    disable_padded_drafter_batch: bool = False
    """Run the drafter on an unpadded batch. Not allowed with full graphs or async scheduling."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel(
                "self.method == 'eagle3' ? has(self.draftModel) : !has(self.draftModel)",
                "method eagle3 needs draftModel (the draft weights); mtp takes none",
            )
        )
    }


class Eplb(ApiModel):
    """vllm-ascend's expert load balancer (`additional_config.eplb_config`): experts move
    between ranks as their load changes (dynamic), or follow a recorded map (static)."""

    dynamic: bool | None = None
    """Rebalance experts while serving (`dynamic_eplb`; the planner also sets the
    `DYNAMIC_EPLB=true` guard vllm-ascend asserts)."""
    expert_map_path: str | None = Field(default=None, max_length=1024, pattern=r"^/.*\.json$")
    """A recorded expert map (JSON file inside the pod) to place experts statically."""
    num_redundant_experts: int | None = Field(default=None, ge=0, le=1024)
    """Extra expert replicas spread over the ranks for hot experts."""
    expert_heat_collection_interval: int | None = Field(default=None, ge=1, le=1_000_000)
    """Steps between expert-load measurements."""
    algorithm_execution_interval: int | None = Field(default=None, ge=1, le=1_000_000)
    """Steps between runs of the placement algorithm."""
    policy_type: int | None = Field(default=None, ge=0, le=3)
    """vllm-ascend's placement policy (0-3)."""
    heat_collection_stage: Literal["all", "prefill", "decode"] | None = None
    """Which steps the load is measured on (v0.23 and later)."""


AdditionalValue = Annotated[
    dict[str, JsonValue],
    WithJsonSchema(
        {"type": "object", "maxProperties": 64, "x-kubernetes-preserve-unknown-fields": True}
    ),
]


class AdditionalConfig(ApiModel):
    """vllm-ascend's `--additional-config`: typed keys the planner renders per runtime line,
    plus `extra` for the rest."""

    eplb: Eplb | None = None
    """Expert load balancing (MoE models)."""
    cpu_binding: bool | None = None
    """Pin engine processes to the NPU's CPU cores (`enable_cpu_binding`); unset keeps the
    line's default (off before v0.18, on from v0.18)."""
    npugraph_ex: bool | None = None
    """The npugraph_ex graph backend (`enable_npugraph_ex`, from v0.13; on by default from
    v0.18)."""
    extra: AdditionalValue = Field(default_factory=dict, max_length=64)
    """Other additional-config keys, passed through as written. Keys the typed fields own are
    refused; keys the runtime line does not read are reported as warnings."""


class KvOffload(ApiModel):
    """Offload of KV-cache blocks to host memory, so that prefixes evicted from the NPU are
    reloaded instead of recomputed."""

    cpu_bytes: Quantity = "0"
    """Host memory per engine rank for offloaded blocks, for example `64Gi`; 0 turns offload
    off."""
    cross_layer_layout: bool = True
    """Keep offloaded blocks in ascend-serve's host pool with all layers of a block contiguous
    (AscendOffloadingSpec), so a block moves as one segment; false uses vLLM's stock CPU
    offloading spec."""


class SimSpec(ApiModel):
    """Settings of the sim engine (the NPU-mocked runtime). By default its latency follows a
    model of the plan: prefill compute-bound, decode bandwidth-bound."""

    fixed_ttft_ms: float | None = Field(default=None, ge=0, le=600_000)
    """Fixed duration of a scheduler step that prefills, instead of the latency model."""
    fixed_itl_ms: float | None = Field(default=None, ge=0, le=600_000)
    """Fixed duration of a decode step (the inter-token latency), instead of the model."""
    kv_cache_blocks: int | None = Field(default=None, ge=1, le=100_000_000)
    """KV-cache blocks per instance, instead of what the devices' memory would hold."""
    kv_transfer_timeout_seconds: float = Field(default=120, gt=0, le=86400)
    """How long a prefill instance keeps a request's blocks for decode to pull."""


EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
"""An environment variable's name."""

CudagraphMode = Literal["FULL_DECODE_ONLY", "PIECEWISE", "FULL_AND_PIECEWISE", "FULL"]
"""ACLGraph capture modes (vLLM's CUDAGraphMode names)."""

VLLM_DEFAULT_CUDAGRAPH_MODE = "FULL_AND_PIECEWISE"
"""vLLM's own default since 0.11 (every supported line)."""


class RuntimeSpec(ApiModel):
    """Engine and runtime settings shared by every role (roles may override some)."""

    image: str | None = Field(default=None, max_length=512)
    """Container image of the engine pods. Default: the vllm-ascend image of `version` (with the
    `-a3` suffix on A3) for engine vllm, the ascend-serve image for engine sim."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy of the engine pods."""
    engine: Literal["vllm", "sim"] = "vllm"
    """`vllm` runs vLLM with vllm-ascend; `sim` runs the NPU-mocked engine (no NPU needed)."""
    version: str = Field(default="v0.23.0", pattern=r"^v?\d+\.\d+(\.\d+)?([.\-+\w]*)?$")
    """vllm-ascend release the image carries; decides which flags and features exist."""
    graph_mode: Literal["aclgraph", "torchair", "eager"] = "aclgraph"
    """`aclgraph` (graph capture, default), `torchair` (releases before v0.13 only), `eager`."""
    cudagraph_mode: CudagraphMode = "FULL_DECODE_ONLY"
    """ACLGraph capture mode (vLLM's `compilation_config.cudagraph_mode`); roles may override
    it. At vLLM's own default (FULL_AND_PIECEWISE) with no capture sizes to pass, no
    `--compilation-config` is rendered."""
    capture_sizes: list[int] | None = Field(default=None, min_length=1, max_length=512)
    """Batch sizes to capture graphs for; the planner's defaults when unset."""
    prefix_caching: bool | None = None
    """vLLM's automatic prefix caching: unset keeps vLLM's default (on); false renders
    `--no-enable-prefix-caching` (as most of vllm-ascend's benchmark configs run), true
    `--enable-prefix-caching`."""
    async_scheduling: bool = True
    """Overlap scheduling with execution (`--async-scheduling`), on roles that capture graphs."""
    speculative: SpeculativeDecoding | None = None
    """MTP speculative decoding."""
    kv_offload: KvOffload | None = None
    """KV-cache offload to host memory."""
    kv_connector: Literal["mooncake", "ascend-serve"] = "mooncake"
    """Prefill->decode KV connector of PD roles: `mooncake` (vllm-ascend's MooncakeConnectorV1,
    the configuration vllm-ascend publishes) or `ascend-serve` (this project's AscendKvConnector:
    PCP/DCP-aware rank map, host-staged cross-layer transfer over Mooncake's engine; not yet
    measured on NPUs)."""
    fused_mc2: bool = False
    """Fused MoE dispatch/combine (`VLLM_ASCEND_ENABLE_FUSED_MC2`). vllm-ascend uses it on A3
    nodes with expert parallelism and falls back to unfused MC2 elsewhere; the planner warns
    where it would fall back, and sizes HCCL_BUFFSIZE for `dispatch_ffn_combine`."""
    fused_mc2_kernel: Literal["dispatch_ffn_combine", "dispatch_gmm_combine_decode"] = (
        "dispatch_ffn_combine"
    )
    """Which fused kernel: `dispatch_ffn_combine` (1: W8A8 dynamic weights, at most 32
    expert-parallel ranks) or `dispatch_gmm_combine_decode` (2: decode steps only, off on
    prefill roles; BF16 weights too)."""
    hccl_buffer_size_mb: int | None = Field(default=None, ge=1, le=65536)
    """HCCL_BUFFSIZE in MB; computed by the planner when unset (at least 200, or what fused
    MC2 needs)."""
    max_num_seqs: int | None = Field(default=None, ge=1, le=65536)
    """Concurrent sequences per engine (data-parallel) rank."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    """Tokens per scheduler step per engine rank."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Fraction of NPU memory the engine may use."""
    block_size: int = Field(default=128, ge=1, le=1024)
    """KV-cache block size in tokens (128 on Ascend)."""
    seed: int | None = Field(default=None, ge=0)
    """Sampling seed for reproducible outputs."""
    sim: SimSpec = Field(default_factory=SimSpec, json_schema_extra={"default": {}})
    """Settings of the sim engine."""
    additional_config: AdditionalConfig | None = None
    """vllm-ascend's `--additional-config` (EPLB, CPU binding, npugraph_ex, other keys)."""
    extra_args: list[str] = Field(default_factory=list, max_length=128)
    """Extra engine arguments, appended last (escape hatch)."""
    env: dict[str, str] = Field(default_factory=dict, max_length=128)
    """Extra environment variables of the engine container (escape hatch; wins over ours)."""
    unset_env: list[EnvName] = Field(default_factory=list, max_length=128)
    """Names of environment variables the planner would set that the engine container must not
    get, e.g. `HCCL_OP_EXPANSION_MODE` or `VLLM_ASCEND_ENABLE_FLASHCOMM1` (`plan` lists them
    all)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel(
                "!has(self.speculative) || !self.speculative.disablePaddedDrafterBatch"
                " || (!self.asyncScheduling && (self.graphMode != 'aclgraph'"
                " || self.cudagraphMode == 'PIECEWISE'))",
                "speculative.disablePaddedDrafterBatch needs asyncScheduling: false and no full"
                " graphs (graphMode eager, or cudagraphMode PIECEWISE)",
            ),
            cel(
                "!has(self.speculative) || !has(self.captureSizes)"
                " || self.speculative.numSpeculativeTokens < 2 || self.graphMode != 'aclgraph'"
                " || self.cudagraphMode == 'PIECEWISE'"
                " || self.captureSizes.all(s, s % (self.speculative.numSpeculativeTokens + 1)"
                " == 0)",
                "captureSizes must all be multiples of numSpeculativeTokens + 1 with full graphs",
            ),
        )
    }


# --------------------------------------------------------------------------- hardware


class Toleration(ApiModel):
    """A pod toleration (as in the Pod API)."""

    key: str | None = None
    """Taint key."""
    operator: Literal["Exists", "Equal"] | None = None
    """`Exists` or `Equal`."""
    value: str | None = None
    """Taint value for `Equal`."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; all when unset."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class HardwareSpec(ApiModel):
    """The NPU nodes to run on. Leave it out only with engine sim (then no NPUs are requested)."""

    profile: Literal["A2", "A3"]
    """Atlas 800 A2 (8 NPUs per node, `huawei.com/Ascend910`) or A3 (16 NPUs per node,
    `huawei.com/ascend-1980`)."""
    resource_name: str | None = Field(default=None, max_length=253)
    """Extended resource the device plugin advertises; the profile's when unset."""
    devices_per_node: int | None = Field(default=None, ge=1, le=64)
    """NPUs per node; the profile's when unset."""
    memory_per_device_gib: int | None = Field(default=None, ge=1, le=1024)
    """HBM per NPU in GiB (A2 comes with 32 or 64); the profile's when unset."""
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Node labels the engine pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations of the engine pods."""
    network_interface: str = Field(default="eth0", max_length=64, pattern=r"^[\w.:-]+$")
    """NIC for HCCL/Gloo/TP sockets (GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME,
    HCCL_SOCKET_IFNAME)."""
    mount_driver: bool = True
    """Mount the Ascend driver files from the host (dcmi, npu-smi, driver lib64, version.info,
    ascend_install.info, hccn.conf)."""
    shm_size: Quantity = "64Gi"
    """Size of /dev/shm in engine pods."""


# --------------------------------------------------------------------------- roles


class Parallelism(ApiModel):
    """How one instance is split. World size per engine rank = tensor x pipeline x
    prefillContext; one pod holds dataLocal engine ranks."""

    tensor: int = Field(default=1, ge=1, le=64)
    """Tensor-parallel size (`--tensor-parallel-size`)."""
    pipeline: int = Field(default=1, ge=1, le=64)
    """Pipeline-parallel size."""
    data: int = Field(default=1, ge=1, le=1024)
    """Data-parallel size of one instance (engine ranks sharing one MoE expert group)."""
    data_local: int | None = Field(default=None, ge=1, le=64)
    """Data-parallel ranks per pod (one pod per node); the most that fit a node when unset."""
    expert: bool = False
    """Expert parallelism for MoE layers (`--enable-expert-parallel`)."""
    prefill_context: int = Field(default=1, ge=1, le=64)
    """Prefill context parallelism (PCP): shards long prompts' tokens across ranks."""
    decode_context: int = Field(default=1, ge=1, le=64)
    """Decode context parallelism (DCP): shards the KV cache across the tensor-parallel ranks."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel(
                "!has(self.dataLocal) || (self.dataLocal <= self.data"
                " && self.data % self.dataLocal == 0)",
                "dataLocal must divide data",
            ),
            cel(
                "self.pipeline == 1 || self.prefillContext == 1",
                "pipeline and prefillContext cannot both be above 1",
            ),
            cel(
                "self.tensor % self.decodeContext == 0",
                "decodeContext must divide tensor (DCP reuses the tensor-parallel ranks)",
            ),
        )
    }


class RoleResources(ApiModel):
    """CPU and memory of a role's pods (the NPUs are derived from the plan)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Resource requests, for example `{cpu: "32", memory: 512Gi}`."""
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Resource limits."""


class RoleSpec(ApiModel):
    """One role: `unified` (prefill and decode in one engine), or `prefill` / `decode` of a
    disaggregated deployment."""

    name: RoleName
    """The role."""
    replicas: int | None = Field(default=None, ge=0, le=1024)
    """Instances of the prefill role. The unified or decode role's instance count is
    `spec.replicas`, the field `kubectl scale` changes."""
    parallelism: Parallelism = Field(default_factory=Parallelism, json_schema_extra={"default": {}})
    """How one instance is split over devices and pods."""
    graph_mode: Literal["aclgraph", "torchair", "eager"] | None = None
    """Overrides spec.runtime.graphMode (prefill instances commonly run eager)."""
    cudagraph_mode: CudagraphMode | None = None
    """Overrides spec.runtime.cudagraphMode (vllm-ascend's PD configs keep vLLM's default on
    prefill and FULL_DECODE_ONLY on decode)."""
    max_num_seqs: int | None = Field(default=None, ge=1, le=65536)
    """Overrides spec.runtime.maxNumSeqs."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    """Overrides spec.runtime.maxNumBatchedTokens."""
    hccl_buffer_size_mb: int | None = Field(default=None, ge=1, le=65536)
    """Overrides spec.runtime.hcclBufferSizeMb."""
    kv_port: int | None = Field(default=None, ge=1024, le=65535)
    """Base port of the Mooncake KV transfer (>= 28000 with 8 NPUs per node, >= 36000 with
    16); the planner's default when unset."""
    resources: RoleResources | None = None
    """CPU and memory of this role's pods."""
    extra_args: list[str] = Field(default_factory=list, max_length=128)
    """Extra engine arguments for this role, after spec.runtime.extraArgs."""
    additional_config: AdditionalConfig | None = None
    """Over spec.runtime.additionalConfig for this role: each typed field set here wins, and
    `extra` keys are merged (this role's win)."""
    env: dict[str, str] = Field(default_factory=dict, max_length=128)
    """Extra environment for this role, over spec.runtime.env."""
    unset_env: list[EnvName] = Field(default_factory=list, max_length=128)
    """Environment variables removed from this role's engine container, after
    spec.runtime.unsetEnv."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel(
                "self.name == 'prefill' || !has(self.replicas)",
                "replicas is for the prefill role only: set the unified or decode instance"
                " count in spec.replicas",
            )
        )
    }


# --------------------------------------------------------------------------- router, workload


class KvAwareSpec(ApiModel):
    """Settings of router policy kv-aware (docs/routing.md)."""

    mode: KvAwareMode | None = None
    """What the router knows of each instance's cache: `precise` follows the engines' KV events
    (the planner turns them on); `approximate` assumes a prompt stays cached where the router
    sent it. Unset: precise with engine sim, approximate with engine vllm (precise there hashes
    as vLLM 0.32 does, which is older lines' vLLM unchecked; the planner warns)."""
    load_weight: float = Field(default=0.25, ge=0, le=100)
    """Prefill blocks that one KV block in use on an instance is worth: higher spreads a hot
    prefix sooner, 0 routes on the cache alone (plus the prefill work already sent)."""
    index_capacity: int = Field(default=131_072, ge=1024, le=16_777_216)
    """Block hashes the router remembers per instance (about 100 bytes each); past it the least
    recently used are forgotten."""
    tokenizer: Literal["engine", "model"] = "engine"
    """How the router gets a prompt's tokens over vLLM engines: `engine` asks an engine's
    /tokenize (a round trip per request, milliseconds on long prompts); `model` mounts the model
    source read-only in the router pods and tokenizes there with the model's tokenizer files,
    remembering shared prefixes (well under a millisecond; a sample is checked against the
    engines). With `model` the router pods must be able to mount the source: a ReadOnlyMany or
    ReadWriteMany claim, or a hostPath present on their nodes. The sim's router always
    tokenizes itself."""


class RouterSpec(ApiModel):
    """The OpenAI-compatible front door (balances unified instances; routes prefill then decode
    in PD mode)."""

    replicas: int = Field(default=1, ge=0, le=64)
    """Router pods."""
    image: str | None = Field(default=None, max_length=512)
    """Router image; the ascend-serve image when unset."""
    policy: RouterPolicy = "least-outstanding"
    """Balancing policy across instances: `least-outstanding` (KV usage breaks ties),
    `round-robin`, or `kv-aware` (where the prompt's prefix is cached, weighed against load;
    turns on prefix caching; PD: chooses the prefill instance)."""
    kv_aware: KvAwareSpec | None = None
    """Settings of policy kv-aware (defaults when unset)."""
    port: int = Field(default=ROUTER_PORT, ge=1, le=65535)
    """Port of the router Service."""
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Type of the router Service."""
    api_keys_secret: str | None = Field(default=None, max_length=253, pattern=NAME_PATTERN)
    """Secret whose `api-keys` entry lists accepted bearer keys, one per line; open when unset."""
    admin_keys_secret: str | None = Field(default=None, max_length=253, pattern=NAME_PATTERN)
    """Secret whose `admin-keys` entry lists the bearer keys of the router's membership
    endpoints (`/instances/add`, `/instances/remove`); those endpoints are off when unset, and
    API keys never open them."""
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1 << 30)
    """Largest accepted request body."""
    max_concurrent_requests: int = Field(default=4096, ge=1, le=1_000_000)
    """Requests in flight per router pod; more get HTTP 429."""
    request_timeout_seconds: int = Field(default=600, ge=1, le=86400)
    """Upper bound on one non-streamed request to one engine instance."""
    first_token_timeout_seconds: int = Field(default=300, ge=1, le=86400)
    """How long the router waits for a stream's first token (or a prefill's answer) before
    it retries the request on another instance; nothing has reached the client by then."""
    inter_token_timeout_seconds: int = Field(default=60, ge=1, le=86400)
    """Longest silence inside a stream before the router ends it with an error event (a frozen
    engine)."""
    body_timeout_seconds: int = Field(default=30, ge=1, le=3600)
    """How long a client may take to send its request body; a slow sender holds no
    concurrency slot while it sends."""
    prefill_retries: int = Field(default=2, ge=0, le=10)
    """Retries of a failed prefill on another instance (PD mode)."""
    resources: RoleResources | None = None
    """CPU and memory of the router pods."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel(
                "!has(self.kvAware) || self.policy == 'kv-aware'",
                "kvAware applies to policy kv-aware only: set policy: kv-aware, or remove kvAware",
            )
        )
    }


class WorkloadSpec(ApiModel):
    """How instances become pods."""

    kind: Literal["auto", "LeaderWorkerSet", "StatefulSet"] = "auto"
    """`LeaderWorkerSet` (one group per instance), `StatefulSet` (one per instance, ordinal 0 is
    the leader, plus a headless Service), or `auto`: LeaderWorkerSet when its CRD is installed
    at creation. The kind chosen is recorded in status.workloadKind and kept: instances move to
    another kind only when this field names it."""
    scheduler_name: str | None = Field(default=None, max_length=253)
    """Scheduler of the engine pods (for example a gang scheduler such as Volcano)."""
    priority_class_name: str | None = Field(default=None, max_length=253)
    """PriorityClass of the engine pods."""
    leader_wait_seconds: int = Field(default=600, ge=1, le=86400)
    """How long a worker pod waits for its leader's DNS name before failing."""
    termination_grace_period_seconds: int = Field(default=60, ge=0, le=3600)
    """Grace period for engine pods to drain."""
    max_unavailable: int = Field(default=1, ge=1, le=1024)
    """Instances of a role that may be down at once: during a rollout (one instance at a time
    by default, each ready before the next moves) and for voluntary disruptions such as node
    drains (the PodDisruptionBudget)."""


# --------------------------------------------------------------------------- spec

_ROLE_SET_RULE = (
    "self.exists(r, r.name == 'unified') ? size(self) == 1"
    " : (self.exists(r, r.name == 'prefill') && self.exists(r, r.name == 'decode'))"
)
_PD_TP_RULE = (
    "!self.exists(r, r.name == 'prefill') || !self.exists(r, r.name == 'decode')"
    " || self.filter(r, r.name == 'prefill')[0].parallelism.tensor"
    " >= self.filter(r, r.name == 'decode')[0].parallelism.tensor"
)


class ModelDeploymentSpec(ApiModel):
    """Desired state of a ModelDeployment."""

    model: ModelSpec
    """The model to serve."""
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, json_schema_extra={"default": {}})
    """Engine and runtime settings."""
    hardware: HardwareSpec | None = None
    """The NPU nodes; required for engine vllm."""
    roles: list[RoleSpec] = Field(
        min_length=1,
        max_length=2,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            **cel_rules(
                cel(_ROLE_SET_RULE, "use one unified role, or a prefill and a decode role"),
                cel(
                    _PD_TP_RULE,
                    "prefill parallelism.tensor must be >= decode parallelism.tensor",
                ),
            ),
        },
    )
    """One `unified` role, or `prefill` and `decode` (PD disaggregation)."""
    replicas: int = Field(default=1, ge=0, le=1024)
    """Instances of the unified role, or of the decode role in PD (the scale subresource)."""
    router: RouterSpec = Field(default_factory=RouterSpec, json_schema_extra={"default": {}})
    """The OpenAI-compatible router."""
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec, json_schema_extra={"default": {}})
    """How instances become pods."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel_rules(
            cel(
                "self.runtime.engine == 'sim' || has(self.hardware)",
                "spec.hardware is required with engine vllm (only engine sim runs without NPUs)",
            )
        )
    }
