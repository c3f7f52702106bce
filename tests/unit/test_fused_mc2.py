"""Fused MC2: the value each role gets, and a warning wherever vllm-ascend would fall back
(its own CI runs fused MC2 with BF16 weights and with MTP; refusing those was wrong)."""

from __future__ import annotations

import pytest

from ascend_operator.planner import plan_manifest
from cel_cases import UPSTREAM_ACCEPTED
from helpers import manifest, pd_roles

ENV = "VLLM_ASCEND_ENABLE_FUSED_MC2"


def mc2_warnings(plan) -> list[str]:
    return [w.message for w in plan.warnings if w.path == "spec.runtime.fusedMc2"]


def test_w8a8_on_a3_uses_the_kernel_without_warnings():
    plan = plan_manifest(
        manifest(
            model={"quantization": "w8a8"}, runtime={"fusedMc2": True, "maxNumBatchedTokens": 8192}
        )
    )
    assert plan.role("unified").runtime_config.env[ENV] == "1"
    assert mc2_warnings(plan) == []


def test_mtp_with_fused_mc2_is_accepted():
    plan = plan_manifest(UPSTREAM_ACCEPTED["mc2-mtp"])
    assert plan.role("unified").runtime_config.env[ENV] == "1"
    assert mc2_warnings(plan) == []


def test_bf16_with_ffn_combine_falls_back_with_a_warning_and_no_buffer_sizing():
    plan = plan_manifest(manifest(runtime={"fusedMc2": True, "maxNumBatchedTokens": 8192}))
    role = plan.role("unified")
    assert role.runtime_config.env[ENV] == "1"  # as upstream writes it; vllm-ascend falls back
    (message,) = mc2_warnings(plan)
    assert "W8A8" in message and "unfused MC2" in message
    assert role.hccl_buffer_mb == 512  # no 778 MB window for a kernel that will not run


def test_decode_kernel_is_off_on_prefill_and_on_for_decode():
    plan = plan_manifest(UPSTREAM_ACCEPTED["mc2-bf16-pd-decode-kernel"])
    assert plan.role("prefill").runtime_config.env[ENV] == "0"
    assert plan.role("decode").runtime_config.env[ENV] == "2"
    assert mc2_warnings(plan) == []  # BF16 is fine for dispatch_gmm_combine_decode


def test_more_than_32_expert_ranks_fall_back_with_a_warning():
    doc = manifest(
        model={"quantization": "w8a8"},
        runtime={"fusedMc2": True, "maxNumSeqs": 16, "maxNumBatchedTokens": 2048},
        roles=pd_roles(decode={"parallelism": {"tensor": 4, "data": 16, "dataLocal": 4}}),
    )
    plan = plan_manifest(doc)
    (message,) = mc2_warnings(plan)
    assert message.startswith("decode:") and "= 64" in message and "at most 32" in message


@pytest.mark.parametrize(
    ("patch", "says"),
    [
        ({"hardware": {"profile": "A2"}, "roles": [{"name": "unified", "parallelism": {
            "tensor": 8, "expert": True}}]}, "A3 nodes only"),
        ({"roles": [{"name": "unified", "parallelism": {"tensor": 4, "data": 4}}]},
         "without expert parallelism"),
        ({"model": {"architecture": {"preset": "qwen3-8b"}},
          "roles": [{"name": "unified", "parallelism": {"tensor": 4, "data": 4}}]},
         "no MoE layers"),
    ],
)  # fmt: skip
def test_other_fallbacks_are_warnings(patch, says):
    doc = manifest(runtime={"fusedMc2": True, "maxNumBatchedTokens": 8192}, **patch)
    doc["spec"]["model"]["quantization"] = "w8a8"
    plan = plan_manifest(doc)
    assert any(says in m for m in mc2_warnings(plan)), plan.warnings
