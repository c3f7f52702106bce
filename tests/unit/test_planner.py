"""The planner's numbers: topology, ranks, ports, flags and environment match FACTS.md."""

from __future__ import annotations

import json

import pytest

from ascend_operator.planner import plan_manifest
from ascend_operator.planner.graphs import consumer_request_slots, default_capture_sizes
from ascend_operator.planner.hccl import fused_mc2_max_tokens, fused_mc2_required_mb
from ascend_runtime.config import PodIdentity
from ascend_runtime.engine_command import engine_command
from helpers import load_example, manifest, pd_roles


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def command(role, worker: int, instance: int = 0):
    ident = PodIdentity(
        instance=instance,
        worker_index=worker,
        pod_ip=f"10.0.{instance}.{worker}",
        leader_address=f"10.0.{instance}.0",
    )
    return engine_command(role.runtime_config, ident)


@pytest.fixture(scope="module")
def pd():
    return plan_manifest(load_example("qwen3-235b-pd.yaml"))


def test_pd_topology(pd):
    prefill, decode = pd.role("prefill"), pd.role("decode")
    assert (prefill.instances, prefill.pods_per_instance, prefill.devices_per_pod) == (1, 1, 16)
    assert (decode.instances, decode.pods_per_instance, decode.devices_per_pod) == (1, 2, 16)
    assert [p.dp_ranks for p in decode.pods] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert pd.total_devices == 48
    assert pd.scaled_role == "decode"


def test_pd_prefill_command(pd):
    cmd = command(pd.role("prefill"), 0)
    argv = cmd.argv
    assert argv[:3] == ["vllm", "serve", "/models/Qwen3-235B-A22B"]
    assert flag(argv, "--tensor-parallel-size") == "8"
    assert flag(argv, "--data-parallel-size") == "2"
    assert flag(argv, "--data-parallel-size-local") == "2"
    assert "--enforce-eager" in argv and "--enable-expert-parallel" in argv
    assert "--headless" not in argv and "--data-parallel-address" not in argv  # one pod
    kv = json.loads(flag(argv, "--kv-transfer-config"))
    assert kv == {
        "kv_connector": "MooncakeConnectorV1",
        "kv_role": "kv_producer",
        "kv_port": 36000,
        "engine_id": "qwen3-235b-pd-prefill-0",
        "kv_connector_extra_config": {
            "use_ascend_direct": True,
            "prefill": {"dp_size": 2, "tp_size": 8},
            "decode": {"dp_size": 8, "tp_size": 4},
        },
    }
    assert cmd.env["HCCL_IF_IP"] == cmd.env["VLLM_HOST_IP"] == "10.0.0.0"


def test_pd_decode_commands(pd):
    decode = pd.role("decode")
    leader, worker = command(decode, 0, instance=1), command(decode, 1, instance=1)
    for cmd in (leader, worker):
        assert flag(cmd.argv, "--tensor-parallel-size") == "4"
        assert flag(cmd.argv, "--data-parallel-size") == "8"
        assert flag(cmd.argv, "--data-parallel-size-local") == "4"
        assert flag(cmd.argv, "--data-parallel-address") == "10.0.1.0"  # the leader's IP
        assert flag(cmd.argv, "--data-parallel-rpc-port") == "13389"
        kv = json.loads(flag(cmd.argv, "--kv-transfer-config"))
        assert kv["kv_role"] == "kv_consumer" and kv["engine_id"] == "qwen3-235b-pd-decode-1"
        assert flag(cmd.argv, "--compilation-config") == '{"cudagraph_mode":"FULL_DECODE_ONLY"}'
    assert "--headless" not in leader.argv
    assert "--headless" in worker.argv
    assert flag(worker.argv, "--data-parallel-start-rank") == "4"
    assert worker.env["HCCL_IF_IP"] == "10.0.1.1"


def test_pd_ports(pd):
    # side channel = kv_port + dp_rank * tp * pp * pcp; handshakes add up to tp - 1
    assert pd.role("prefill").pods[0].kv_ports == (36000, 36015)
    assert [p.kv_ports for p in pd.role("decode").pods] == [(36100, 36115), (36116, 36131)]


def test_environment(pd):
    env = pd.role("decode").runtime_config.env
    assert env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert env["HCCL_OP_EXPANSION_MODE"] == "AIV"
    assert env["OMP_PROC_BIND"] == "false" and env["OMP_NUM_THREADS"] == "1"
    assert env["TASK_QUEUE_ENABLE"] == "1"
    assert env["VLLM_ASCEND_ENABLE_FLASHCOMM1"] == "1"  # MoE with TP > 1
    for key in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME"):
        assert env[key] == "eth0"
    assert env["HCCL_BUFFSIZE"] == "512"


def test_multi_node_example():
    plan = plan_manifest(load_example("qwen3-235b-multi-node.yaml"))
    role = plan.role("unified")
    assert (role.pods_per_instance, role.devices_per_pod) == (2, 16)
    worker = command(role, 1)
    assert flag(worker.argv, "--data-parallel-start-rank") == "2"
    assert flag(worker.argv, "--data-parallel-size") == "4"
    assert flag(worker.argv, "--data-parallel-size-local") == "2"
    assert "--headless" in worker.argv


def test_single_node_128k_yarn():
    plan = plan_manifest(load_example("qwen3-235b-a3-single-node.yaml"))
    argv = command(plan.role("unified"), 0).argv
    assert flag(argv, "--max-model-len") == "131072"
    assert json.loads(flag(argv, "--hf-overrides")) == {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1000000,
            "factor": 4,
            "original_max_position_embeddings": 32768,
        },
        "max_position_embeddings": 131072,  # vLLM 0.32 no longer derives it from the factor
    }
    assert "--async-scheduling" in argv
    assert "--data-parallel-address" not in argv  # all four DP ranks on one pod


def test_old_runtime_spells_rope_scaling():
    doc = load_example("qwen3-235b-a3-single-node.yaml")
    doc["spec"]["runtime"]["version"] = "v0.11.0"
    argv = plan_manifest(doc).role("unified").runtime_config.engine_args
    assert "--hf-overrides" not in argv
    assert json.loads(flag(argv, "--rope-scaling"))["rope_type"] == "yarn"


def test_default_data_local_fills_a_node():
    plan = plan_manifest(
        manifest(
            roles=[{"name": "unified", "parallelism": {"tensor": 8, "data": 4, "expert": True}}]
        )
    )
    role = plan.role("unified")
    assert role.runtime_config.topology.data_local == 2 and role.pods_per_instance == 2


def test_mtp_capture_sizes_are_multiples_and_prefill_drafts_one():
    doc = manifest(
        model={"architecture": {"preset": "deepseek-v3"}},
        runtime={"speculative": {"numSpeculativeTokens": 3}, "maxNumSeqs": 32},
        roles=pd_roles(
            prefill={"parallelism": {"tensor": 8}},
            decode={"parallelism": {"tensor": 8, "data": 4, "dataLocal": 2}},
        ),
    )
    plan = plan_manifest(doc)
    decode, prefill = plan.role("decode"), plan.role("prefill")
    assert decode.capture_sizes_explicit
    assert all(s % 4 == 0 for s in decode.capture_sizes)
    slots = consumer_request_slots(32, 4)  # 32 + 2 + 1
    assert slots == 35
    assert max(decode.capture_sizes) == 4 * max(default_capture_sizes(slots))
    compilation = json.loads(flag(decode.runtime_config.engine_args, "--compilation-config"))
    assert compilation["cudagraph_capture_sizes"] == list(decode.capture_sizes)
    spec_cfg = json.loads(flag(prefill.runtime_config.engine_args, "--speculative-config"))
    assert spec_cfg == {"method": "mtp", "num_speculative_tokens": 1}
    spec_cfg = json.loads(flag(decode.runtime_config.engine_args, "--speculative-config"))
    assert spec_cfg["num_speculative_tokens"] == 3


def test_default_capture_sizes():
    sizes = default_capture_sizes(512)
    assert sizes[:4] == [1, 2, 4, 8]
    assert 248 in sizes and 252 not in sizes and 256 in sizes and 272 in sizes
    assert sizes[-1] == 512


def test_hccl_formula_inverse():
    need = fused_mc2_required_mb(4096, 8, 4096)
    assert need == 394  # 4096 x 8 x 4096 x 3 B = 384 MiB, + 10
    assert fused_mc2_max_tokens(need, 8, 4096) >= 4096
    assert fused_mc2_required_mb(fused_mc2_max_tokens(500, 8, 4096), 8, 4096) <= 500


def test_sim_engine_requests_no_npus():
    plan = plan_manifest(load_example("tiny-sim.yaml"))
    role = plan.role("unified")
    assert plan.total_devices == 0 and plan.hardware.resource_name is None
    assert role.instances == 2
    cmd = command(role, 0)
    assert cmd.argv[:2] == ["ascend-serve", "sim"]


def test_hugging_face_source_runs_offline():
    plan = plan_manifest(
        manifest(
            model={
                "source": {
                    "pvc": None,
                    "huggingFace": {
                        "id": "Qwen/Qwen3-235B-A22B",
                        "revision": "main",
                        "cache": {"claimName": "hf"},
                    },
                }
            }
        )
    )
    cfg = plan.role("unified").runtime_config
    assert cfg.model_path == "Qwen/Qwen3-235B-A22B"
    assert cfg.env["HF_HUB_OFFLINE"] == "1" and cfg.env["HF_HOME"] == "/hf-cache"
    assert flag(cfg.engine_args, "--revision") == "main"


def test_user_env_wins():
    plan = plan_manifest(
        manifest(
            runtime={"env": {"HCCL_BUFFSIZE": "1024", "X": "1"}},
            roles=[{"name": "unified", "env": {"X": "2"}}],
        )
    )
    env = plan.role("unified").runtime_config.env
    assert env["HCCL_BUFFSIZE"] == "1024" and env["X"] == "2"


def test_lws_fallback_is_reported():
    from ascend_operator.api import ModelDeployment
    from ascend_operator.planner import ClusterInfo
    from ascend_operator.planner.plan import plan as do_plan

    md = ModelDeployment.from_manifest(manifest())
    assert do_plan(md, ClusterInfo(lws_available=True)).workload_kind == "LeaderWorkerSet"
    fallback = do_plan(md, ClusterInfo(lws_available=False))
    assert fallback.workload_kind == "StatefulSet" and fallback.workload_fallback
    leader = fallback.role("unified").runtime_config.leader
    assert leader.workload == "StatefulSet" and leader.headless_service == "m-unified"


def test_pd_with_ascend_serve_connector_loads_it_out_of_tree():
    doc = load_example("qwen3-235b-pd.yaml")
    doc["spec"]["runtime"]["kvConnector"] = "ascend-serve"
    plan, default = plan_manifest(doc), plan_manifest(load_example("qwen3-235b-pd.yaml"))
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        kv = json.loads(flag(command(plan.role(role), 0).argv, "--kv-transfer-config"))
        mooncake = json.loads(flag(command(default.role(role), 0).argv, "--kv-transfer-config"))
        assert kv["kv_connector"] == "AscendKvConnector"
        assert kv["kv_connector_module_path"] == "ascend_runtime.kv.vllm_connector"
        assert kv["kv_role"] == kv_role and kv["kv_port"] == mooncake["kv_port"]
        assert kv["engine_id"] == mooncake["engine_id"]
        assert kv["kv_connector_extra_config"] == {
            "transport": "mooncake",
            "kv_layout": "cross_layer",
        }


@pytest.mark.parametrize("cross_layer", [True, False])
def test_kv_offload_renders_ascend_serve_pool_or_vllm_spec(cross_layer):
    doc = load_example("qwen3-235b-a3-single-node.yaml")
    doc["spec"]["runtime"]["kvOffload"] = {"cpuBytes": "8Gi", "crossLayerLayout": cross_layer}
    plan = plan_manifest(doc)
    kv = json.loads(flag(command(plan.role("unified"), 0).argv, "--kv-transfer-config"))
    assert kv["kv_connector"] == "OffloadingConnector" and kv["kv_role"] == "kv_both"
    extra = kv["kv_connector_extra_config"]
    if cross_layer:
        assert extra["spec_module_path"] == "ascend_runtime.kv.vllm_offload"
        assert extra["spec_name"] == "AscendOffloadingSpec"
        assert extra["cpu_bytes_per_rank"] == 8 * 2**30 and extra["kv_layout"] == "cross_layer"
    else:
        assert extra == {"cpu_bytes_to_use": 8 * 2**30}
