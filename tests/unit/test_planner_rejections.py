"""Each invalid spec from the acceptance list is rejected with the field and the fix."""

from __future__ import annotations

import pytest

from ascend_operator.planner import PlanError, Problem, plan_manifest
from helpers import manifest, pd_roles


def problems(doc: dict) -> list[Problem]:
    with pytest.raises(PlanError) as exc:
        plan_manifest(doc)
    return exc.value.problems


def only(doc: dict, path: str) -> Problem:
    found = [p for p in problems(doc) if p.path == path]
    assert found, f"no problem at {path}: {problems(doc)}"
    return found[0]


def test_devices_per_pod_exceed_node():
    doc = manifest(
        roles=[
            {
                "name": "unified",
                "parallelism": {"tensor": 8, "data": 4, "dataLocal": 4, "expert": True},
            }
        ]
    )
    p = only(doc, "spec.roles[0].parallelism.dataLocal")
    assert "8 x 4 = 32 devices per pod" in p.message and "has 16" in p.message
    assert "at most 2" in p.fix


def test_engine_rank_wider_than_node():
    doc = manifest(
        hardware={"profile": "A2"},
        roles=[{"name": "unified", "parallelism": {"tensor": 8, "pipeline": 2}}],
    )
    p = only(doc, "spec.roles[0].parallelism")
    assert "= 16 devices per engine rank" in p.message and "has 8" in p.message
    assert "cannot span nodes" in p.fix


def test_prefill_tp_below_decode_tp():
    doc = manifest(
        roles=pd_roles(
            prefill={"parallelism": {"tensor": 2}}, decode={"parallelism": {"tensor": 4}}
        )
    )
    p = only(doc, "spec.roles[0].parallelism.tensor")
    assert "prefill tensor 2 is below decode tensor 4" in p.message
    assert "at least 4" in p.fix


def test_pcp_with_pp():
    doc = manifest(
        runtime={"version": "v0.13.0"},
        roles=[
            {"name": "unified", "parallelism": {"tensor": 4, "pipeline": 2, "prefillContext": 2}}
        ],
    )
    p = only(doc, "spec.roles[0].parallelism")
    assert "prefillContext 2 and pipeline 2" in p.message
    assert "not both" in p.fix


def test_pcp_on_runtime_without_it():
    doc = manifest(
        runtime={"version": "v0.23.0"},
        roles=[{"name": "unified", "parallelism": {"tensor": 8, "prefillContext": 2}}],
    )
    p = only(doc, "spec.roles[0].parallelism.prefillContext")
    assert "v0.23" in p.message and "#12728" in p.message
    assert "v0.13.x" in p.fix
    # the same spec is fine on a line that has PCP
    plan_manifest(
        manifest(
            runtime={"version": "v0.13.0"},
            roles=[{"name": "unified", "parallelism": {"tensor": 8, "prefillContext": 2}}],
        )
    )


def test_mtp_more_than_16_tokens():
    doc = manifest(
        model={"architecture": {"preset": "deepseek-v3"}},
        runtime={"speculative": {"numSpeculativeTokens": 16}},
    )
    p = only(doc, "spec.runtime.speculative.numSpeculativeTokens")
    assert "15" in p.message  # N + 1 <= 16


def test_capture_sizes_not_multiple_of_n_plus_1():
    doc = manifest(
        model={"architecture": {"preset": "deepseek-v3"}},
        runtime={"speculative": {"numSpeculativeTokens": 2}, "captureSizes": [3, 6, 8, 12]},
    )
    p = only(doc, "spec.runtime.captureSizes")
    assert "multiple of 3" in p.message and "[8]" in p.message
    assert "multiples of 3" in p.fix


def test_fused_mc2_buffer_too_small_says_by_how_much():
    doc = manifest(
        model={"quantization": "w8a8"},
        runtime={"fusedMc2": True, "hcclBufferSizeMb": 512, "maxNumBatchedTokens": 32768},
    )
    p = only(doc, "spec.runtime.hcclBufferSizeMb")
    # 32768 tokens over TP 4 = 8192 per rank; x 8 x 4096 x 3 B = 768 MiB, + 10 MB = 778 MB.
    assert "266 MB short" in p.message and "778 MB" in p.message
    assert "8192 per rank" in p.message
    assert "at least 778" in p.fix and "maxNumBatchedTokens to at most" in p.fix
    # vllm-ascend's own high-throughput recipe (TP 4, 16384 tokens, HCCL_BUFFSIZE 1024) fits.
    plan_manifest(
        manifest(
            model={"quantization": "w8a8"},
            runtime={"fusedMc2": True, "hcclBufferSizeMb": 1024, "maxNumBatchedTokens": 16384},
        )
    )


def test_fused_mc2_buffer_planned_when_unset():
    plan = plan_manifest(
        manifest(
            model={"quantization": "w8a8"},
            runtime={"fusedMc2": True, "maxNumBatchedTokens": 32768},
        )
    )
    role = plan.role("unified")
    assert role.hccl_buffer_mb == 778
    assert role.runtime_config.env["HCCL_BUFFSIZE"] == "778"
    assert role.runtime_config.env["VLLM_ASCEND_ENABLE_FUSED_MC2"] == "1"


def test_torchair_on_runtime_without_it():
    doc = manifest(runtime={"graphMode": "torchair"})
    p = only(doc, "spec.runtime.graphMode")
    assert "#4814" in p.message and "v0.23" in p.message
    assert "aclgraph" in p.fix
    role_override = manifest(roles=pd_roles(prefill={"graphMode": "torchair"}))
    assert only(role_override, "spec.roles[0].graphMode")
    plan_manifest(manifest(runtime={"graphMode": "torchair", "version": "v0.11.0"}))


def test_no_model_source():
    doc = manifest(model={"source": {"pvc": None}})
    p = only(doc, "spec.model.source")
    assert "no model source" in p.message
    assert "pvc, hostPath or huggingFace" in p.fix


def test_two_model_sources():
    doc = manifest(model={"source": {"hostPath": {"path": "/data/m"}}})
    p = only(doc, "spec.model.source")
    assert "2 sources are set (pvc, hostPath)" in p.message


@pytest.mark.parametrize(
    ("patch", "path", "suggestion"),
    [
        ({"runtime": {"grapMode": "eager"}}, "spec.runtime.grapMode", "graphMode"),
        ({"model": {"maxModelLength": 4096}}, "spec.model.maxModelLength", "maxModelLen"),
        (
            {"roles": [{"name": "unified", "parallelism": {"tensr": 4}}]},
            "spec.roles[0].parallelism.tensr",
            "tensor",
        ),
    ],
)
def test_unknown_fields(patch, path, suggestion):
    p = only(manifest(**patch), path)
    assert "unknown field" in p.message
    assert f"did you mean `{suggestion}`" in p.fix


def test_all_problems_reported_at_once():
    doc = manifest(
        model={"source": {"pvc": None}},
        runtime={"graphMode": "torchair"},
        roles=pd_roles(prefill={"parallelism": {"tensor": 2, "pipeline": 2, "prefillContext": 2}}),
    )
    paths = {p.path for p in problems(doc)}
    assert {
        "spec.model.source",
        "spec.runtime.graphMode",
        "spec.roles[0].parallelism",
        "spec.roles[0].parallelism.tensor",
        "spec.roles[0].parallelism.prefillContext",
    } <= paths


def test_unsupported_runtime_version():
    p = only(manifest(runtime={"version": "v0.20.1"}), "spec.runtime.version")
    assert "v0.23.x" in p.fix


def test_engine_vllm_needs_hardware():
    p = only(manifest(hardware=None), "spec.hardware")
    assert "engine: sim" in p.fix


def test_replicas_on_decode_role_points_to_spec_replicas():
    doc = manifest(roles=pd_roles(decode={"replicas": 2}))
    p = only(doc, "spec.roles[1].replicas")
    assert "spec.replicas" in p.fix


def test_kv_port_below_the_advised_floor_is_a_warning_and_past_65535_an_error():
    # vllm-ascend's nightly CI runs PD on A3 with kvPort 30000 / 30100: accepted, with a warning
    planned = plan_manifest(manifest(roles=pd_roles(prefill={"kvPort": 30000})))
    (w,) = [w for w in planned.warnings if w.path == "spec.roles[0].kvPort"]
    assert "below 36000" in w.message and "16 NPUs" in w.message and "30000-" in w.message
    assert str(w).endswith("(vllm-ascend's own CI runs below it and works)")
    p = only(manifest(roles=pd_roles(prefill={"kvPort": 65530})), "spec.roles[0].kvPort")
    assert "passes 65535" in p.message


def test_dcp_gqa_heads():
    # Qwen3-235B has 4 KV heads: with TP 4 each head sits on one rank, so DCP 2 cannot shard.
    doc = manifest(roles=[{"name": "unified", "parallelism": {"tensor": 4, "decodeContext": 2}}])
    p = only(doc, "spec.roles[0].parallelism.decodeContext")
    assert "4 KV heads" in p.message
    plan_manifest(
        manifest(roles=[{"name": "unified", "parallelism": {"tensor": 8, "decodeContext": 2}}])
    )


def test_mtp_on_model_without_mtp_layers():
    p = only(
        manifest(runtime={"speculative": {"numSpeculativeTokens": 1}}), "spec.runtime.speculative"
    )
    assert "MTP layers" in p.message


def test_yarn_too_short_for_max_model_len():
    doc = manifest(
        model={
            "maxModelLen": 200000,
            "ropeScaling": {"factor": 4, "originalMaxPositionEmbeddings": 32768},
        }
    )
    p = only(doc, "spec.model.maxModelLen")
    assert "131072" in p.message


def test_bad_quantity():
    p = only(manifest(hardware={"profile": "A3", "shmSize": "lots"}), "spec.hardware.shmSize")
    assert "not a Kubernetes quantity" in p.message


def test_long_name():
    doc = manifest()
    doc["metadata"]["name"] = "x" * 40
    assert "at most 39" in only(doc, "metadata.name").fix


def _embed(**spec_patch):
    base = {
        # an embedding model of bge-m3's size, not the base manifest's Qwen3-235B
        "model": {"task": "embed", "maxModelLen": 8192, "architecture": {"preset": "tiny"}},
        "runtime": {"cudagraphMode": "PIECEWISE", "maxNumBatchedTokens": 8192},
    }
    return manifest(**{**base, **spec_patch})


def test_embed_rejects_prefill_decode_roles():
    doc = _embed(roles=pd_roles())
    for i, name in enumerate(("prefill", "decode")):
        p = only(doc, f"spec.roles[{i}].name")
        assert f"no {name} role" in p.message and "unified" in p.fix


def test_embed_rejects_mtp_offload_and_decode_graphs_all_at_once():
    doc = _embed(
        runtime={
            "cudagraphMode": "FULL_DECODE_ONLY",
            "maxNumBatchedTokens": 4096,
            "speculative": {"method": "mtp", "numSpeculativeTokens": 1},
            "kvOffload": {"cpuBytes": "8Gi"},
        }
    )
    paths = {p.path for p in problems(doc)}
    assert {
        "spec.runtime.speculative",
        "spec.runtime.kvOffload",
        "spec.runtime.cudagraphMode",
        "spec.runtime.maxNumBatchedTokens",
    } <= paths
    assert "PIECEWISE" in only(doc, "spec.runtime.cudagraphMode").fix
    assert "at least 8192" in only(doc, "spec.runtime.maxNumBatchedTokens").fix


def test_embed_renders_the_pooling_runner_and_encoder_graphs():
    one_npu = [{"name": "unified", "parallelism": {"tensor": 1}}]
    plan = plan_manifest(_embed(roles=one_npu, hardware={"profile": "A2"}))
    args = plan.role("unified").runtime_config.engine_args
    i = args.index("--runner")
    assert args[i : i + 4] == ["--runner", "pooling", "--convert", "embed"]
    assert "--async-scheduling" not in args
    compilation = args[args.index("--compilation-config") + 1]
    assert '"cudagraph_mode":"PIECEWISE"' in compilation
    assert '"cudagraph_capture_sizes":[1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192]' in (
        compilation
    )
    assert plan.role("unified").runtime_config.task == "embed"


def test_tensor_that_does_not_split_the_heads():
    # Qwen3-235B-A22B: 64 attention heads, 4 KV heads
    p = only(
        manifest(roles=[{"name": "unified", "parallelism": {"tensor": 3}}]),
        "spec.roles[0].parallelism.tensor",
    )
    assert "does not divide the model's 64 attention heads" in p.message
    assert "[1, 2, 4, 8, 16, 32, 64]" in p.fix
    doc = manifest(
        model={"architecture": {"preset": "qwen3-8b", "numAttentionHeads": 24, "numKvHeads": 6}},
        roles=[{"name": "unified", "parallelism": {"tensor": 4}}],
    )
    p = only(doc, "spec.roles[0].parallelism.tensor")
    assert "6 KV heads" in p.message and "[1, 2, 3, 6, 12, 24]" in p.fix


def test_weights_that_do_not_fit_are_refused_with_the_arithmetic():
    # Qwen3-235B BF16 on 4 x 32 GB A2 devices: about 110 GiB of weights per device
    doc = manifest(
        hardware={"profile": "A2", "memoryPerDeviceGib": 32},
        model={"maxModelLen": 32768},
        roles=[{"name": "unified", "parallelism": {"tensor": 4}}],
    )
    p = only(doc, "spec.roles[0].parallelism")
    assert "does not fit in memory per device" in p.message and "28.8 GiB" in p.message
    assert "W8A8" in p.fix


def test_memory_budget_is_in_the_plan():
    from ascend_operator.plan_table import plan_table

    plan = plan_manifest(manifest(model={"maxModelLen": 32768}))
    mem = plan.role("unified").memory
    # TP4 x DP4 with expert parallelism: dense / 4 + experts / 16, 2 bytes each
    assert 28 < mem.weights < 32 and mem.sequences_at_full_length > 1
    assert "memory per device: 57.6 GiB budget" in plan_table(plan)
