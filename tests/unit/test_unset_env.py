"""unsetEnv removes variables the planner would set; `plan` says which it set and why."""

from __future__ import annotations

import pytest

from ascend_operator.planner import PlanError, plan_manifest
from helpers import manifest, pd_roles


def env(plan, role: str) -> dict[str, str]:
    return plan.role(role).runtime_config.env


def test_runtime_and_role_names_are_removed():
    plan = plan_manifest(
        manifest(
            runtime={"unsetEnv": ["HCCL_OP_EXPANSION_MODE"]},
            roles=pd_roles(decode={"unsetEnv": ["VLLM_ASCEND_ENABLE_FLASHCOMM1"]}),
        )
    )
    assert "HCCL_OP_EXPANSION_MODE" not in env(plan, "prefill")
    assert "HCCL_OP_EXPANSION_MODE" not in env(plan, "decode")
    assert env(plan, "prefill")["VLLM_ASCEND_ENABLE_FLASHCOMM1"] == "1"
    assert "VLLM_ASCEND_ENABLE_FLASHCOMM1" not in env(plan, "decode")


def test_a_role_may_set_again_what_the_runtime_removes():
    plan = plan_manifest(
        manifest(
            runtime={"unsetEnv": ["OMP_NUM_THREADS"]},
            roles=[{"name": "unified", "env": {"OMP_NUM_THREADS": "100"},
                    "parallelism": {"tensor": 4, "data": 4, "expert": True}}],
        )
    )  # fmt: skip
    assert env(plan, "unified")["OMP_NUM_THREADS"] == "100"


def test_removed_and_set_at_one_level_is_refused():
    doc = manifest(runtime={"unsetEnv": ["HCCL_BUFFSIZE"], "env": {"HCCL_BUFFSIZE": "1024"}})
    with pytest.raises(PlanError) as err:
        plan_manifest(doc)
    (p,) = err.value.problems
    assert p.path == "spec.runtime.unsetEnv" and "HCCL_BUFFSIZE" in p.message


def test_names_must_be_variable_names():
    with pytest.raises(PlanError) as err:
        plan_manifest(manifest(runtime={"unsetEnv": ["A=B"]}))
    assert any(p.path.startswith("spec.runtime.unsetEnv") for p in err.value.problems)


def test_plan_lists_our_choices_with_reasons_and_not_the_users():
    from ascend_operator.plan_table import plan_table

    text = plan_table(plan_manifest(manifest(runtime={"env": {"OMP_NUM_THREADS": "100"}})))
    assert "HCCL_OP_EXPANSION_MODE=AIV: collectives expanded" in text
    assert "--async-scheduling: off in vLLM by default" in text
    assert "cudagraph_mode FULL_DECODE_ONLY: vLLM's default is FULL_AND_PIECEWISE" in text
    assert "OMP_NUM_THREADS=" not in text.split("chosen here")[1]  # the user's own value
    removed = plan_table(plan_manifest(manifest(runtime={"unsetEnv": ["HCCL_OP_EXPANSION_MODE"]})))
    assert "HCCL_OP_EXPANSION_MODE" not in removed
