"""RuntimeConfig: everything one engine pod needs, rendered by the operator into a ConfigMap.

The operator fills it from the plan; the launcher reads it, resolves the pod's own identity
(instance, worker index, IP, leader address) from the workload environment, and builds the
engine command with `ascend_runtime.engine_command`. Nothing here imports the operator.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from .roles import (
    DP_RPC_PORT,
    ENGINE_HTTP_PORT,
    KV_EVENTS_PORT,
    KV_EVENTS_REPLAY_PORT,
    ROUTER_PORT,
    KvAwareMode,
    RoleName,
    RouterPolicy,
)

SCHEMA_VERSION = 1


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    _omit_when_empty: ClassVar[tuple[str, ...]] = ()
    """Fields left out of the serialized config while None or empty, so that configs of
    deployments that do not use them (and the pod template hashes derived from them) stay as
    they were before the fields existed."""

    @model_serializer(mode="wrap")
    def _drop_unset_optionals(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_when_empty:
            if data.get(key) in (None, {}):
                data.pop(key, None)
        return data


class Topology(_Config):
    """How one instance is laid out over pods and devices."""

    pods_per_instance: int = Field(ge=1)
    devices_per_pod: int = Field(ge=0)
    tensor: int = Field(default=1, ge=1)
    pipeline: int = Field(default=1, ge=1)
    data: int = Field(default=1, ge=1)
    data_local: int = Field(default=1, ge=1)
    prefill_context: int = Field(default=1, ge=1)
    decode_context: int = Field(default=1, ge=1)
    expert: bool = False
    data_parallel_rpc_port: int = DP_RPC_PORT

    @property
    def ranks_devices(self) -> int:
        """Devices of one engine (data-parallel) rank: TP x PP x PCP."""
        return self.tensor * self.pipeline * self.prefill_context


class KvTransfer(_Config):
    """Mooncake KV transfer between prefill (producer) and decode (consumer) instances."""

    connector: str = "MooncakeConnectorV1"
    module_path: str | None = None
    """`kv_connector_module_path` of an out-of-tree connector (ascend-serve's own); left out of
    the serialized config when unset, so pods of the default connector keep their hash."""

    @model_serializer(mode="wrap")
    def _drop_unset_module(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("module_path") is None:
            data.pop("module_path", None)
        return data

    kv_role: Literal["kv_producer", "kv_consumer"]
    kv_port: int = Field(ge=1024, le=65535)
    engine_id_prefix: str
    """The instance index is appended: `<prefix>-<instance>`."""
    extra_config: dict[str, Any] = Field(default_factory=dict)


class LeaderDiscovery(_Config):
    """How a worker pod finds its instance's leader (worker index 0)."""

    workload: Literal["LeaderWorkerSet", "StatefulSet"]
    namespace: str
    headless_service: str | None = None
    """StatefulSet only: the governing headless Service; the leader is `<sts>-0.<service>`."""
    wait_seconds: int = Field(default=600, ge=1)
    """Retry budget for the leader's DNS name to resolve."""


DEFAULT_EMBEDDING_DIM = 1024


class StepModel(_Config):
    """Per-device costs of one engine step, computed by the planner from the model's
    architecture and the hardware's published figures (planner/sim_model.py); the sim engine
    turns a step's tokens into seconds with them (sim/latency.py). Every data-parallel rank of
    an instance steps in lockstep (MoE layers synchronise them), so one rank's share of the
    step's tokens sets the time."""

    data_parallel: int = Field(ge=1)
    layers: int = Field(ge=1)
    dense_weight_bytes: float = Field(ge=0)
    """Non-expert weights one device reads every step (its tensor-parallel share)."""
    expert_weight_bytes: float = Field(ge=0)
    """One expert's weights (all layers) on one device: whole under expert parallelism, a
    tensor-parallel share without it."""
    local_experts: float = Field(ge=0)
    """Experts whose weights one device holds (0: a dense model)."""
    experts: int = Field(ge=0)
    experts_per_token: int = Field(ge=0)
    expert_parallel: bool
    flops_per_token: float = Field(ge=0)
    """Matmul FLOPs one device spends per token of its data-parallel rank (dense share plus
    its share of the token's experts)."""
    attention_flops_per_context_token: float = Field(ge=0)
    """Attention FLOPs one device spends per (query token, context token) pair."""
    kv_bytes_per_token: float = Field(ge=0)
    """KV-cache bytes of one token one device reads (all layers; heads split or replicated)."""
    hbm_bytes_per_second: float = Field(gt=0)
    matmul_flops_per_second: float = Field(gt=0)
    """Peak for the weights' matmuls (INT8 for W8A8)."""
    attention_flops_per_second: float = Field(gt=0)
    tp_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    tp_link_bytes_per_second: float = Field(gt=0)
    allreduces_per_layer: int = Field(ge=0)
    """Tensor-parallel all-reduces per layer (attention; the MLP too without expert
    parallelism)."""
    moe_floor_seconds_per_layer: float = Field(ge=0)
    """Dispatch + combine of one MoE layer at decode sizes (published low-latency kernel
    time): no MoE step is faster."""
    moe_dispatch_bytes_per_second: float = Field(gt=0)
    moe_combine_bytes_per_second: float = Field(gt=0)
    kv_transfer_bytes_per_token: float = Field(default=0.0, ge=0)
    """PD: KV bytes per prompt token one prefill device sends to decode."""
    kv_link_bytes_per_second: float = Field(default=1.0, gt=0)


DEFAULT_KV_EVENTS_ENDPOINT = f"tcp://*:{KV_EVENTS_PORT}"
"""vLLM's default KV-events publisher endpoint (`--kv-events-config`); data-parallel rank r
publishes on port + r."""


class KvEventsSettings(_Config):
    """Where an engine publishes its KV events (vLLM's `--kv-events-config` fields)."""

    endpoint: str = DEFAULT_KV_EVENTS_ENDPOINT
    replay_endpoint: str | None = None
    """A ROUTER socket that resends buffered batches from a sequence number (None: none)."""
    topic: str = ""


class SimSettings(_Config):
    """The sim engine's capacity and latency model (filled by the planner from the plan)."""

    block_size: int = Field(default=128, ge=1)
    num_blocks: int = Field(default=8192, ge=1)
    """KV-cache blocks of one instance."""
    max_num_seqs: int = Field(default=256, ge=1)
    """Concurrent sequences of one instance (all its data-parallel ranks)."""
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    max_model_len: int = Field(default=4096, ge=2)
    seed: int = 0
    prefill_tokens_per_second: float = Field(default=0.0, ge=0)
    """Compute-bound prefill throughput of the instance; 0 = instantaneous."""
    decode_step_seconds: float = Field(default=0.0, ge=0)
    """Bandwidth-bound time of one decode step (weights read once per step)."""
    decode_seconds_per_kv_token: float = Field(default=0.0, ge=0)
    """Extra step time per cached token read by attention."""
    fixed_ttft_seconds: float | None = Field(default=None, ge=0)
    """Fixed time of a step that prefills (overrides the model; for tests)."""
    fixed_itl_seconds: float | None = Field(default=None, ge=0)
    """Fixed time of a decode step (overrides the model; for tests)."""
    kv_transfer_timeout_seconds: float = Field(default=120.0, gt=0)
    """How long a prefill instance holds blocks for a decode instance to pull."""
    default_max_tokens: int = Field(default=16, ge=1)
    """Output length when a request names none (OpenAI's completions default)."""
    embedding_dim: int | None = Field(default=None, ge=1)
    """Length of the vectors /v1/embeddings returns (task: embed; None: 1024, bge-m3's).
    Left out of the serialized config when unset (as are kv_heads and kv_mla), so other
    deployments' configs (and the pod template hashes derived from them) stay as they were."""

    kv_heads: int | None = Field(default=None, ge=1)
    """The model's KV heads, for the rank map of PD transfers (None: one head on every rank)."""
    kv_mla: bool | None = None
    """MLA cache (one latent head on every TP rank, K and V of different sizes)."""
    step_model: StepModel | None = None
    """Physical per-step costs; when set it replaces the linear model above (fixed times still
    win)."""
    prefix_caching: bool | None = None
    """Automatic prefix caching as vLLM does it (block-hash chains, LRU eviction of free cached
    blocks); None or false: off."""
    kv_events: KvEventsSettings | None = None
    """Publish the prefix cache's KV events on vLLM's wire (needs prefix_caching)."""

    @model_validator(mode="after")
    def _events_need_a_cache(self) -> SimSettings:
        if self.kv_events is not None and not self.prefix_caching:
            raise ValueError(
                "sim.kv_events needs sim.prefix_caching: true (the events describe the prefix "
                "cache; vLLM publishes none without it)"
            )
        return self

    _omit_when_empty = (
        "embedding_dim", "kv_heads", "kv_mla", "step_model", "prefix_caching", "kv_events"
    )  # fmt: skip

    @property
    def vector_dim(self) -> int:
        """The embedding length in use."""
        return self.embedding_dim or DEFAULT_EMBEDDING_DIM


class RuntimeConfig(_Config):
    """Configuration of every pod of one role."""

    schema_version: Literal[1] = SCHEMA_VERSION
    deployment: str
    namespace: str
    role: RoleName
    engine: Literal["vllm", "sim"]
    runtime_version: str
    model_path: str
    """Path (or Hugging Face id, resolved offline from HF_HOME) given to `vllm serve`."""
    served_model_name: str
    task: Literal["generate", "embed"] = "generate"
    http_port: int = ENGINE_HTTP_PORT
    engine_args: list[str] = Field(default_factory=list)
    """Flags shared by every pod of the role; per-pod flags are added by engine_command."""
    env: dict[str, str] = Field(default_factory=dict)
    """Static environment; HCCL_IF_IP and VLLM_HOST_IP are set per pod from its IP."""
    topology: Topology
    kv_transfer: KvTransfer | None = None
    leader: LeaderDiscovery
    max_model_len: int | None = None
    seed: int | None = None
    sim: SimSettings = Field(default_factory=SimSettings)
    """Used by the sim engine only."""


class PodIdentity(_Config):
    """Who this pod is, resolved at start from the workload environment."""

    instance: int = Field(ge=0)
    worker_index: int = Field(ge=0)
    pod_ip: str
    leader_address: str
    """IP of the instance's leader (the pod's own IP on the leader)."""


class RouterBackends(_Config):
    """Where the router finds engine instances (leader pods) of each role."""

    source: Literal["kubernetes", "static", "file"] = "kubernetes"
    namespace: str | None = None
    services: dict[str, str] = Field(default_factory=dict)
    """Role -> Service whose EndpointSlices list the role's instance leaders."""
    static: dict[str, list[str]] = Field(default_factory=dict)
    """Role -> base URLs, for `source: static`."""
    file: str | None = None
    """JSON file of role -> base URLs, re-read on change, for `source: file`."""
    engine_port: int = ENGINE_HTTP_PORT
    kv_events: dict[str, KvEventsEndpoint] = Field(default_factory=dict)
    """Instance base URL -> where it publishes KV events, for instances that do not use the
    kv-aware ports on their own host (`ascend-serve up`, where they share one)."""

    _omit_when_empty = ("kv_events",)


class KvEventsEndpoint(_Config):
    """Where a router subscribes to one instance's KV events."""

    endpoint: str
    replay_endpoint: str | None = None


class KvAwareRouting(_Config):
    """The kv-aware policy's settings (router/kv_routing.py)."""

    mode: KvAwareMode
    block_size: int = Field(ge=1)
    """The engines' KV block size: the router hashes prompts in blocks of this many tokens."""
    load_weight: float = Field(default=0.25, ge=0)
    """Prefill blocks one KV block in use on an instance is worth in the cost."""
    index_capacity: int = Field(default=131_072, ge=1)
    """Block hashes the router keeps per instance (about 100 bytes each)."""
    kv_blocks: dict[str, int] = Field(default_factory=dict)
    """Role -> KV blocks of one instance, to turn its reported KV usage into blocks."""
    events_port: int = Field(default=KV_EVENTS_PORT, ge=1, le=65535)
    replay_port: int | None = Field(default=KV_EVENTS_REPLAY_PORT, ge=1, le=65535)
    topic: str = ""
    hashing: Literal["sim", "vllm"] = "sim"
    """How the engines hash blocks: the sim's way over its own tokenizer (the router tokenizes
    locally), or vLLM's (kv/vllm_hash.py over the tokens an engine's /tokenize returns)."""
    vllm_hash_algo: Literal["sha256", "sha256_cbor"] = "sha256_cbor"
    """The engines' `--prefix-caching-hash-algo` (hashing vllm)."""
    vllm_hash_seed: str | None = "0"
    """The engines' PYTHONHASHSEED (None: unset, vLLM's fixed default seed; hashing vllm)."""
    ranks: dict[str, int] = Field(default_factory=dict)
    """Role -> data-parallel ranks publishing on an instance's leader, rank r on the ports +
    r (vLLM's rule); 1 when unset (the sim publishes once per instance)."""
    tokenizer: str | None = None
    """Hashing vllm: the model directory (or Hugging Face id, from the local cache) whose
    tokenizer the router loads to tokenize prompts itself; unset, an engine's /tokenize."""
    tokenizer_revision: str | None = None
    """The revision of a Hugging Face id `tokenizer`."""

    _omit_when_empty = ("ranks", "tokenizer", "tokenizer_revision")

    def endpoints(self, role: str, url: str, backends: RouterBackends) -> list[KvEventsEndpoint]:
        """Where the instance at `url` publishes its events, one entry per data-parallel
        rank: the explicit entry (rank 0), else the kv-aware ports on the instance's host."""
        base = backends.kv_events.get(url.rstrip("/"))
        if base is None:
            host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
            replay = f"tcp://{host}:{self.replay_port}" if self.replay_port else None
            base = KvEventsEndpoint(
                endpoint=f"tcp://{host}:{self.events_port}", replay_endpoint=replay
            )
        return [
            KvEventsEndpoint(
                endpoint=rank_endpoint(base.endpoint, r),
                replay_endpoint=rank_endpoint(base.replay_endpoint, r)
                if base.replay_endpoint
                else None,
            )
            for r in range(self.ranks.get(role, 1))
        ]


def rank_endpoint(endpoint: str, rank: int) -> str:
    """vLLM's rule: data-parallel rank r publishes on the endpoint's port + r."""
    if rank == 0 or not endpoint.startswith("tcp://"):
        return endpoint if rank == 0 else f"{endpoint}_dp{rank}"
    base, _, port = endpoint.rpartition(":")
    return endpoint if port == "0" else f"{base}:{int(port) + rank}"


class RouterConfig(_Config):
    """Configuration of the router pods."""

    schema_version: Literal[1] = SCHEMA_VERSION
    deployment: str
    served_model_name: str
    mode: Literal["unified", "pd"]
    port: int = ROUTER_PORT
    policy: RouterPolicy = "least-outstanding"
    kv_aware: KvAwareRouting | None = None
    """Settings of policy kv-aware (required with it)."""

    _omit_when_empty = ("kv_aware",)
    backends: RouterBackends
    api_keys_file: str | None = None
    admin_keys_file: str | None = None
    """Bearer keys of the membership endpoints (/instances/add, /instances/remove); they are
    off when unset."""
    max_request_bytes: int = 4 * 1024 * 1024
    max_concurrent_requests: int = 4096
    request_timeout_seconds: int = 600
    """Bound on a whole non-streamed exchange with one instance."""
    first_token_timeout_seconds: float = Field(default=300.0, gt=0)
    """Bound on the wait for a stream's first chunk, and for a prefill answer; past it the
    request is retried on another instance (nothing has reached the client yet)."""
    inter_token_timeout_seconds: float = Field(default=60.0, gt=0)
    """Longest silence inside a stream before the router ends it with an error event."""
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    """Bound on receiving a request body (a slow sender holds no concurrency slot meanwhile)."""
    health_timeout_seconds: float = Field(default=5.0, gt=0)
    prefill_retries: int = 2
    max_model_len: int | None = None

    @model_validator(mode="after")
    def _kv_aware_settings(self) -> RouterConfig:
        if (self.policy == "kv-aware") != (self.kv_aware is not None):
            raise ValueError(
                "policy kv-aware and the kv_aware settings go together: set both or neither"
            )
        return self
