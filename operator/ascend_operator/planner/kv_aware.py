"""Planning router policy kv-aware: which mode it runs in, what it asks of the engines
(prefix caching, KV events) and the router's settings. Pure functions over the spec."""

from __future__ import annotations

from collections.abc import Sequence

from ascend_runtime.config import KvAwareRouting, KvEventsSettings
from ascend_runtime.roles import KV_EVENTS_PORT, KV_EVENTS_REPLAY_PORT, KvAwareMode, Role

from ..api.spec import KvAwareSpec, ModelDeploymentSpec
from .problems import Problem
from .results import RolePlan


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
    if mode(spec) == "precise" and spec.runtime.engine == "vllm":
        problems.append(
            Problem(
                "spec.router.kvAware.mode",
                "precise follows the engines' KV events, and with engine vllm the router does "
                "not yet take each prompt's tokens from the engines or render vLLM's event "
                "flags (docs/routing.md, Limits)",
                "use mode: approximate (or leave mode unset) with engine vllm",
            )
        )


def kv_events(spec: ModelDeploymentSpec, role: str) -> KvEventsSettings | None:
    """Where an engine of `role` publishes KV events: precise mode, on the roles the router
    places by prefix (unified, prefill; decode instances take the prefill's KV)."""
    if mode(spec) != "precise" or role == Role.DECODE:
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
    return KvAwareRouting(
        mode=chosen,
        block_size=spec.runtime.block_size,
        load_weight=settings.load_weight,
        index_capacity=settings.index_capacity,
        kv_blocks={r.name: r.runtime_config.sim.num_blocks for r in roles},
    )
