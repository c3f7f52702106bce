"""Role names and the ports every pod of a deployment agrees on: one home for each, imported by
the operator (API defaults, planner, renderer) and the runtime (launcher, router, sim)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args


class Role(StrEnum):
    """The role of an engine instance: prefill and decode together (`unified`), or one side of
    a disaggregated (PD) deployment."""

    UNIFIED = "unified"
    PREFILL = "prefill"
    DECODE = "decode"


RoleName = Literal["unified", "prefill", "decode"]
"""The same names as a type for pydantic fields (a Literal keeps the schema and the error
messages plain; the assertion below keeps it equal to Role)."""
assert get_args(RoleName) == tuple(Role), "RoleName and Role disagree"

RouterPolicy = Literal["least-outstanding", "round-robin", "kv-aware"]
"""How the router balances the instances of a role (spec.router.policy, RouterConfig.policy)."""

KvAwareMode = Literal["precise", "approximate"]
"""What feeds the kv-aware policy's prefix index: the engines' KV events (`precise`) or the
router's own routing history (`approximate`)."""

PD_ROLES = (Role.PREFILL, Role.DECODE)
"""The roles of a disaggregated deployment, in rollout and display order."""

ENGINE_HTTP_PORT = 8000
"""The OpenAI API port of every engine pod (vLLM's default)."""

ROUTER_PORT = 8000
"""The router's port (its Service and `ascend-serve up`) unless spec.router.port says otherwise."""

KV_EVENTS_PORT = 5557
"""Where an engine publishes its KV events (vLLM's default `--kv-events-config` endpoint);
data-parallel rank r publishes on this port + r."""

KV_EVENTS_REPLAY_PORT = 5657
"""The engine's KV-event replay socket (rank r: + r); 100 above the events so that up to 100
data-parallel ranks do not collide."""

DP_RPC_PORT = 13389
"""`--data-parallel-rpc-port` of multi-node instances (vllm-ascend's published value)."""
