"""Per-role ACLGraph capture modes (vLLM's default left to vLLM) and the prefix-caching field."""

from __future__ import annotations

import json

import pytest

from ascend_operator.planner import PlanError, plan_manifest
from helpers import manifest, pd_roles


def compilation(plan, role: str) -> dict | None:
    args = plan.role(role).runtime_config.engine_args
    if "--compilation-config" not in args:
        return None
    return json.loads(args[args.index("--compilation-config") + 1])


def test_roles_override_the_runtime_mode():
    plan = plan_manifest(
        manifest(
            roles=pd_roles(
                {"graphMode": "aclgraph", "cudagraphMode": "FULL_AND_PIECEWISE"},
                {"cudagraphMode": "FULL"},
            )
        )
    )
    # prefill at vLLM's default, as vllm-ascend's PD configs leave it: no flag at all
    assert compilation(plan, "prefill") is None
    assert compilation(plan, "decode") == {"cudagraph_mode": "FULL"}


def test_runtime_default_is_still_rendered():
    plan = plan_manifest(manifest())
    assert compilation(plan, "unified") == {"cudagraph_mode": "FULL_DECODE_ONLY"}


def test_capture_sizes_are_kept_at_the_default_mode():
    plan = plan_manifest(
        manifest(runtime={"cudagraphMode": "FULL_AND_PIECEWISE", "captureSizes": [8, 16]})
    )
    assert compilation(plan, "unified") == {"cudagraph_capture_sizes": [8, 16]}


def test_a_role_with_full_graphs_refuses_an_unpadded_drafter():
    doc = manifest(
        model={"architecture": {"preset": "deepseek-v3"}},
        runtime={
            "asyncScheduling": False,
            "cudagraphMode": "PIECEWISE",
            "speculative": {"numSpeculativeTokens": 1, "disablePaddedDrafterBatch": True},
        },
        roles=[{"name": "unified", "cudagraphMode": "FULL", "parallelism": {"tensor": 16}}],
    )
    with pytest.raises(PlanError) as err:
        plan_manifest(doc)
    assert any(
        p.path == "spec.runtime.speculative.disablePaddedDrafterBatch" for p in err.value.problems
    )


@pytest.mark.parametrize(
    ("value", "flag"),
    [(None, None), (False, "--no-enable-prefix-caching"), (True, "--enable-prefix-caching")],
)
def test_prefix_caching_field(value, flag):
    runtime = {} if value is None else {"prefixCaching": value}
    args = plan_manifest(manifest(runtime=runtime)).role("unified").runtime_config.engine_args
    found = [a for a in args if a.endswith("enable-prefix-caching")]
    assert found == ([flag] if flag else [])
