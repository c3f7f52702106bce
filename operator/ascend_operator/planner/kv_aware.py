"""Planning router policy kv-aware: which mode it runs in, what it asks of the engines
(prefix caching, KV events) and the router's settings. Pure functions over the spec."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ascend_runtime.config import KvAwareRouting, KvEventsSettings
from ascend_runtime.roles import KV_EVENTS_PORT, KV_EVENTS_REPLAY_PORT, KvAwareMode

from ..api.spec import KvAwareSpec, ModelDeploymentSpec
from .capabilities import RuntimeCapabilities
from .model_source import model_path
from .problems import PlanWarning, Problem
from .results import RolePlan

VLLM_HASH_ALGO = "sha256_cbor"
"""`--prefix-caching-hash-algo` of precise mode: CBOR is language- and version-neutral."""
VLLM_HASH_SEED = "0"
"""PYTHONHASHSEED of precise mode's engines (the seed of vLLM's block-hash chain)."""


def mode(spec: ModelDeploymentSpec) -> KvAwareMode | None:
    """The kv-aware mode this deployment runs, None when its policy is another."""
    if spec.router.policy != "kv-aware":
        return None
    chosen = (spec.router.kv_aware or KvAwareSpec()).mode
    if chosen is not None:
        return chosen
    return "precise" if spec.runtime.engine == "sim" else "approximate"


def check(spec: ModelDeploymentSpec, problems: list[Problem]) -> None:
    """What policy kv-aware needs of the rest of the spec (the CRD's CEL checks the first
    rule too; this covers runs without an API server)."""
    router = spec.router
    if router.kv_aware is not None and router.policy != "kv-aware":
        problems.append(
            Problem(
                "spec.router.kvAware",
                f"kvAware is set and the policy is {router.policy}",
                "set spec.router.policy: kv-aware, or remove kvAware",
            )
        )
    if router.policy != "kv-aware":
        return
    if spec.runtime.prefix_caching is False:
        problems.append(
            Problem(
                "spec.runtime.prefixCaching",
                "policy kv-aware routes to cached prefixes, and prefix caching is off",
                "remove prefixCaching: false (kv-aware turns it on), or pick another "
                "spec.router.policy",
            )
        )


def check_ranks(
    spec: ModelDeploymentSpec, roles: Sequence[RolePlan], problems: list[Problem]
) -> None:
    """Precise mode with vLLM follows the data-parallel ranks on each leader pod only."""
    if mode(spec) != "precise" or spec.runtime.engine != "vllm":
        return
    index = {r.name: i for i, r in enumerate(spec.roles)}
    for role in roles:
        topo = role.runtime_config.topology
        if topo.data > topo.data_local:
            problems.append(
                Problem(
                    f"spec.roles[{index[role.name]}].parallelism.dataLocal",
                    f"precise kv-aware routing follows the KV events of the data-parallel "
                    f"ranks on each instance's leader pod, and {role.name} places "
                    f"{topo.data - topo.data_local} of its {topo.data} ranks on worker pods",
                    "keep every rank on the leader (dataLocal = data), or use "
                    "spec.router.kvAware.mode: approximate",
                )
            )


def warnings(spec: ModelDeploymentSpec, caps: RuntimeCapabilities) -> list[PlanWarning]:
    """What precise mode with vLLM engines cannot promise on this runtime line."""
    if mode(spec) != "precise" or spec.runtime.engine != "vllm" or caps.vllm_block_hashes:
        return []
    return [
        PlanWarning(
            "spec.router.kvAware.mode",
            f"precise mode hashes prompts as vLLM 0.32 does (checked against its KV events); "
            f"vllm-ascend {caps.line} runs vLLM {caps.vllm}, where the hashes were not checked. "
            "If they differ the router places every request by load",
            "watch ascend_serve_router_kv_hit_blocks_total against _kv_prompt_blocks_total; "
            "if hits stay at 0, use mode: approximate",
        )
    ]


def vllm_args(spec: ModelDeploymentSpec, role: str) -> list[str]:
    """vLLM flags of precise mode: KV events on wildcard endpoints (vLLM binds only those;
    rank r publishes on port + r) and the hash the router reproduces."""
    events = kv_events(spec, role)
    if events is None or spec.runtime.engine != "vllm":
        return []
    config = {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": events.endpoint,
        "replay_endpoint": events.replay_endpoint, "topic": events.topic,
    }  # fmt: skip
    return [
        "--kv-events-config", json.dumps(config, separators=(",", ":")),
        "--prefix-caching-hash-algo", VLLM_HASH_ALGO,
    ]  # fmt: skip


def vllm_env(spec: ModelDeploymentSpec, role: str) -> dict[str, str]:
    """The engines' PYTHONHASHSEED in precise mode: vLLM lines before mid-2026 seed their
    block-hash chain randomly per process unless it is set."""
    return {"PYTHONHASHSEED": VLLM_HASH_SEED} if vllm_args(spec, role) else {}


def kv_events(spec: ModelDeploymentSpec, role: str) -> KvEventsSettings | None:
    """Where an engine of `role` publishes KV events: precise mode, every role (the router
    places unified and prefill requests by prefix, and in PD the decode too: a decode instance
    that caches the prompt's prefix pulls only the rest)."""
    if mode(spec) != "precise":
        return None
    return KvEventsSettings(
        endpoint=f"tcp://*:{KV_EVENTS_PORT}", replay_endpoint=f"tcp://*:{KV_EVENTS_REPLAY_PORT}"
    )


def prefix_caching(spec: ModelDeploymentSpec) -> bool | None:
    """Prefix caching as the engines should run it: on under kv-aware, else the spec's."""
    return True if mode(spec) is not None else spec.runtime.prefix_caching


def routing(spec: ModelDeploymentSpec, roles: Sequence[RolePlan]) -> KvAwareRouting | None:
    """The router's kv-aware settings, None under another policy."""
    chosen = mode(spec)
    if chosen is None:
        return None
    settings = spec.router.kv_aware or KvAwareSpec()
    vllm = spec.runtime.engine == "vllm"
    hf = spec.model.source.hugging_face
    return KvAwareRouting(
        mode=chosen,
        block_size=spec.runtime.block_size,
        load_weight=settings.load_weight,
        index_capacity=settings.index_capacity,
        kv_blocks={r.name: r.runtime_config.sim.num_blocks for r in roles},
        hashing="vllm" if vllm else "sim",
        vllm_hash_algo=VLLM_HASH_ALGO,
        vllm_hash_seed=VLLM_HASH_SEED,
        ranks={r.name: r.runtime_config.topology.data_local for r in roles} if vllm else {},
        tokenizer=model_path(spec) if vllm and settings.tokenizer == "model" else None,
        tokenizer_revision=hf.revision if vllm and settings.tokenizer == "model" and hf else None,
    )
