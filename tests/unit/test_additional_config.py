"""spec.runtime/roles[].additionalConfig (vllm-ascend's --additional-config) and Eagle3 drafts:
what each runtime line is given, and what is refused or warned about."""

from __future__ import annotations

import json

import pytest

from ascend_operator.local_setup import local_draft
from ascend_operator.planner import PlanError, plan_manifest
from helpers import manifest, pd_roles

EPLB = {"dynamic": True, "expertHeatCollectionInterval": 2048, "algorithmExecutionInterval": 200}


def _role_args(plan, role: str = "unified") -> list[str]:
    return next(r for r in plan.roles if r.name == role).runtime_config.engine_args


def _json_flag(args: list[str], flag: str) -> dict | None:
    values = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == flag]
    assert len(values) <= 1, f"{flag} given {len(values)} times"
    return values[0] if values else None


def _problems(doc) -> dict[str, str]:
    with pytest.raises(PlanError) as info:
        plan_manifest(doc)
    return {p.path: p.message for p in info.value.problems}


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (
            "v0.23.0",
            {
                "eplb_config": {
                    "dynamic_eplb": True,
                    "expert_heat_collection_interval": 2048,
                    "algorithm_execution_interval": 200,
                },
                "enable_cpu_binding": True,
                "ascend_compilation_config": {
                    "fuse_norm_quant": False,
                    "enable_npugraph_ex": False,
                },
            },
        ),
        (
            "v0.13.0",
            {
                "eplb_config": {
                    "dynamic_eplb": True,
                    "expert_heat_collection_interval": 2048,
                    "algorithm_execution_interval": 200,
                },
                "enable_cpu_binding": True,
                "enable_npugraph_ex": False,
                "ascend_compilation_config": {"fuse_norm_quant": False},
            },
        ),
    ],
)
def test_typed_keys_are_spelled_as_the_line_reads_them(version, expected):
    doc = manifest(
        runtime={
            "version": version,
            "additionalConfig": {
                "eplb": EPLB,
                "cpuBinding": True,
                "npugraphEx": False,
                "extra": {"ascend_compilation_config": {"fuse_norm_quant": False}},
            },
        }
    )
    plan = plan_manifest(doc)
    assert _json_flag(_role_args(plan), "--additional-config") == expected
    env = plan.roles[0].runtime_config.env
    assert env["DYNAMIC_EPLB"] == "true"


def test_v0_11_gets_flat_eplb_keys_next_to_torchair_in_one_flag():
    doc = manifest(
        runtime={
            "version": "v0.11.0",
            "graphMode": "torchair",
            "captureSizes": [8, 16],
            "additionalConfig": {"eplb": {"numRedundantExperts": 16, "policyType": 1}},
        }
    )
    config = _json_flag(_role_args(plan_manifest(doc)), "--additional-config")
    assert config == {
        "torchair_graph_config": {"enabled": True, "graph_batch_sizes": [8, 16]},
        "init_redundancy_expert": 16,
        "eplb_policy_type": 1,
    }
    assert "DYNAMIC_EPLB" not in plan_manifest(doc).roles[0].runtime_config.env


def test_roles_override_typed_fields_and_merge_extra_keys():
    doc = manifest(
        runtime={
            "asyncScheduling": False,
            "additionalConfig": {
                "cpuBinding": True,
                "extra": {"multistream_overlap_gate": True, "enable_kv_nz": False},
            },
        },
        roles=pd_roles(
            {"kvPort": 36000, "additionalConfig": {"cpuBinding": False}},
            {"kvPort": 36100, "additionalConfig": {"extra": {"enable_kv_nz": True}}},
        ),
    )
    plan = plan_manifest(doc)
    assert _json_flag(_role_args(plan, "prefill"), "--additional-config") == {
        "enable_cpu_binding": False,
        "multistream_overlap_gate": True,
        "enable_kv_nz": False,
    }
    assert _json_flag(_role_args(plan, "decode"), "--additional-config") == {
        "enable_cpu_binding": True,
        "multistream_overlap_gate": True,
        "enable_kv_nz": True,
    }


def test_nothing_set_renders_no_flag():
    assert _json_flag(_role_args(plan_manifest(manifest())), "--additional-config") is None


def test_keys_a_typed_field_owns_are_refused_with_the_field_to_use():
    doc = manifest(
        runtime={
            "additionalConfig": {
                "npugraphEx": True,
                "extra": {
                    "enable_fused_mc2": 1,
                    "eplb_config": {"dynamic_eplb": True},
                    "ascend_compilation_config": {"enable_npugraph_ex": False},
                },
            }
        }
    )
    problems = _problems(doc)
    base = "spec.runtime.additionalConfig.extra"
    assert "typed field" in problems[f"{base}.enable_fused_mc2"]
    assert "typed field" in problems[f"{base}.eplb_config"]
    assert "typed field" in problems[f"{base}.ascend_compilation_config.enable_npugraph_ex"]


def test_a_key_the_line_does_not_read_is_a_warning_not_an_error():
    doc = manifest(runtime={"additionalConfig": {"extra": {"enable_multistream_moe": True}}})
    plan = plan_manifest(doc)
    (warning,) = [w for w in plan.warnings if "additionalConfig" in w.path]
    assert warning.path == "spec.runtime.additionalConfig.extra.enable_multistream_moe"
    assert "v0.23" in warning.message and "no effect" in warning.message
    assert _json_flag(_role_args(plan), "--additional-config") == {"enable_multistream_moe": True}


def test_additional_config_in_extra_args_is_refused_when_ours_would_be_replaced():
    doc = manifest(
        runtime={
            "additionalConfig": {"cpuBinding": True},
            "extraArgs": ['--additional-config={"refresh": true}'],
        }
    )
    assert "vLLM keeps the last one" in _problems(doc)["spec.runtime.extraArgs"]
    alone = manifest(runtime={"extraArgs": ["--additional-config", '{"refresh": true}']})
    assert "--additional-config" in _role_args(plan_manifest(alone))


def test_fields_a_line_lacks_and_eplb_without_experts_are_refused():
    old = manifest(
        runtime={
            "version": "v0.11.0",
            "graphMode": "eager",
            "additionalConfig": {"npugraphEx": True},
        }
    )
    assert "no npugraph_ex" in _problems(old)["spec.runtime.additionalConfig.npugraphEx"]
    stage = manifest(
        runtime={"version": "v0.18.0", "additionalConfig": {"eplb": {"heatCollectionStage": "all"}}}
    )
    assert "spec.runtime.additionalConfig.eplb.heatCollectionStage" in _problems(stage)
    dense = manifest(
        model={"architecture": {"preset": "qwen3-8b"}},
        roles=[{"name": "unified", "parallelism": {"tensor": 4}}],
        runtime={"additionalConfig": {"eplb": EPLB}},
    )
    assert "needs a MoE model" in _problems(dense)["spec.runtime.additionalConfig.eplb"]


def test_dynamic_eplb_keeps_its_guard_variable_and_wants_expert_parallelism():
    unset = manifest(runtime={"additionalConfig": {"eplb": EPLB}, "unsetEnv": ["DYNAMIC_EPLB"]})
    assert "DYNAMIC_EPLB=true" in _problems(unset)["spec.roles[0].unsetEnv"]
    no_ep = manifest(
        runtime={"additionalConfig": {"eplb": EPLB}},
        roles=[{"name": "unified", "parallelism": {"tensor": 4, "data": 4}}],
    )
    paths = [w.path for w in plan_manifest(no_ep).warnings]
    assert "spec.roles[0].parallelism.expert" in paths


def test_bad_eplb_values_are_refused_by_the_schema():
    bad = manifest(
        runtime={"additionalConfig": {"eplb": {"policyType": 7, "expertMapPath": "map.txt"}}}
    )
    problems = _problems(bad)
    assert "spec.runtime.additionalConfig.eplb.policyType" in problems
    assert "spec.runtime.additionalConfig.eplb.expertMapPath" in problems


# --------------------------------------------------------------------------- Eagle3


def _eagle(**source):
    return manifest(
        model={"quantization": "w8a8", **source},
        runtime={
            "speculative": {
                "method": "eagle3",
                "draftModel": "Qwen3-235B-A22B-Eagle3",
                "numSpeculativeTokens": 3,
            }
        },
        roles=[{"name": "unified", "parallelism": {"tensor": 16, "expert": True}}],
    )


def test_eagle3_draft_under_the_model_volume():
    args = _role_args(plan_manifest(_eagle()))
    assert _json_flag(args, "--speculative-config") == {
        "method": "eagle3",
        "model": "/models/Qwen3-235B-A22B-Eagle3",
        "num_speculative_tokens": 3,
    }
    compilation = _json_flag(args, "--compilation-config")
    assert all(s % 4 == 0 for s in compilation["cudagraph_capture_sizes"])


def test_eagle3_from_hugging_face_keeps_the_id():
    doc = _eagle(
        source={"pvc": None, "huggingFace": {"id": "Qwen/Qwen3-8B", "cache": {"claimName": "hf"}}}
    )
    doc["spec"]["runtime"]["speculative"]["draftModel"] = "AngelSlim/Qwen3-8B_eagle3"
    config = _json_flag(_role_args(plan_manifest(doc)), "--speculative-config")
    assert config["model"] == "AngelSlim/Qwen3-8B_eagle3"
    doc["spec"]["runtime"]["speculative"]["draftModel"] = "eagle3"
    assert "Hugging Face id" in _problems(doc)["spec.runtime.speculative.draftModel"]


def test_eagle3_drafts_are_checked():
    escape = _eagle()
    escape["spec"]["runtime"]["speculative"]["draftModel"] = "../other/eagle3"
    assert "leaves the model volume" in _problems(escape)["spec.runtime.speculative.draftModel"]
    missing = _eagle()
    del missing["spec"]["runtime"]["speculative"]["draftModel"]
    assert "needs draftModel" in _problems(missing)["spec.runtime.speculative.draftModel"]
    mtp = manifest(
        model={"architecture": {"preset": "deepseek-v3"}},
        runtime={"speculative": {"numSpeculativeTokens": 1, "draftModel": "x"}},
    )
    assert "takes no draft" in _problems(mtp)["spec.runtime.speculative.draftModel"]


def test_up_moves_the_draft_to_the_local_model_directory():
    args = ["--speculative-config", '{"method":"eagle3","model":"/models/eagle3","x":1}']
    moved = local_draft(args, "/data/qwen3")
    assert json.loads(moved[1]) == {"method": "eagle3", "model": "/data/qwen3/eagle3", "x": 1}
    assert local_draft(["--seed", "1"], "/data") == ["--seed", "1"]
