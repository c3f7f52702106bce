"""Planning router policy kv-aware (planner/kv_aware.py): what it turns on in the engines, what
the router is told, and the specs it refuses with the field and the fix. Pure planning."""

from __future__ import annotations

import json

import pytest

from ascend_operator.planner import PlanError, plan_manifest
from ascend_runtime.config import RouterBackends
from ascend_runtime.roles import KV_EVENTS_PORT, KV_EVENTS_REPLAY_PORT
from helpers import load_example, manifest, merge


def _kv(doc: dict, **router: object) -> dict:
    return merge(doc, {"spec": {"router": {"policy": "kv-aware", **router}}})


def _problems(doc: dict) -> dict[str, str]:
    with pytest.raises(PlanError) as exc:
        plan_manifest(doc)
    return {p.path: f"{p.message} | {p.fix}" for p in exc.value.problems}


def test_sim_deployments_default_to_precise_with_events_on_every_role():
    plan = plan_manifest(_kv(load_example("tiny-sim-pd.yaml")))
    kv = plan.router.config.kv_aware
    assert kv is not None and kv.mode == "precise"
    assert kv.block_size == plan.spec.runtime.block_size
    for role in plan.roles:
        assert kv.kv_blocks[role.name] == role.runtime_config.sim.num_blocks
        sim = role.runtime_config.sim
        assert sim.prefix_caching is True
        # decode too: the router places it where the prompt's prefix is cached
        assert sim.kv_events is not None
        assert sim.kv_events.endpoint == f"tcp://*:{KV_EVENTS_PORT}"
        assert sim.kv_events.replay_endpoint == f"tcp://*:{KV_EVENTS_REPLAY_PORT}"
    (where,) = kv.endpoints("prefill", "http://10.1.2.3:8000", plan.router.config.backends)
    assert where.endpoint == f"tcp://10.1.2.3:{KV_EVENTS_PORT}"
    assert kv.hashing == "sim" and kv.ranks == {}


def test_vllm_deployments_default_to_approximate_and_turn_prefix_caching_on():
    plan = plan_manifest(_kv(manifest(), kvAware={"loadWeight": 0.5, "indexCapacity": 4096}))
    kv = plan.router.config.kv_aware
    assert kv is not None and kv.mode == "approximate"
    assert (kv.load_weight, kv.index_capacity) == (0.5, 4096)
    args = plan.role("unified").runtime_config.engine_args
    assert "--enable-prefix-caching" in args and "--no-enable-prefix-caching" not in args
    assert not any("kv-events" in a for a in args)


def test_precise_with_vllm_renders_vllms_events_and_hash_and_warns():
    plan = plan_manifest(_kv(manifest(), kvAware={"mode": "precise"}))
    config = plan.role("unified").runtime_config
    args = config.engine_args
    events = json.loads(args[args.index("--kv-events-config") + 1])
    assert events == {
        "enable_kv_cache_events": True, "publisher": "zmq",
        "endpoint": f"tcp://*:{KV_EVENTS_PORT}",
        "replay_endpoint": f"tcp://*:{KV_EVENTS_REPLAY_PORT}", "topic": "",
    }  # fmt: skip
    assert args[args.index("--prefix-caching-hash-algo") + 1] == "sha256_cbor"
    assert config.env["PYTHONHASHSEED"] == "0"
    kv = plan.router.config.kv_aware
    assert (kv.hashing, kv.vllm_hash_algo, kv.vllm_hash_seed) == ("vllm", "sha256_cbor", "0")
    assert kv.ranks == {"unified": 4}  # TP4 x DP4 on one A3 node: four ranks publish
    ports = [w.endpoint for w in kv.endpoints("unified", "http://10.0.0.9:8000", RouterBackends())]
    assert ports == [f"tcp://10.0.0.9:{KV_EVENTS_PORT + r}" for r in range(4)]
    assert any(w.path == "spec.router.kvAware.mode" and "not checked" in w.message
               for w in plan.warnings)  # fmt: skip


def test_other_policies_render_no_kv_aware_settings():
    plan = plan_manifest(load_example("tiny-sim.yaml"))
    assert plan.router.config.kv_aware is None
    assert "kv_aware" not in plan.router.config.model_dump()
    assert plan.role("unified").runtime_config.sim.kv_events is None


@pytest.mark.parametrize(
    ("doc", "path", "words"),
    [
        (
            _kv(
                manifest(
                    roles=[
                        {"name": "unified", "parallelism": {"tensor": 4, "data": 8, "dataLocal": 4}}
                    ]
                ),
                kvAware={"mode": "precise"},
            ),
            "spec.roles[0].parallelism.dataLocal",
            "mode: approximate",
        ),
        (
            merge(
                _kv(load_example("tiny-sim.yaml")), {"spec": {"runtime": {"prefixCaching": False}}}
            ),
            "spec.runtime.prefixCaching",
            "remove prefixCaching: false",
        ),
        (
            merge(
                load_example("tiny-sim.yaml"),
                {"spec": {"router": {"kvAware": {"mode": "precise"}}}},
            ),
            "spec.router.kvAware",
            "policy: kv-aware",
        ),
    ],
    ids=["precise-vllm-ranks-on-workers", "caching-off", "settings-without-the-policy"],
)
def test_specs_kv_aware_cannot_serve_are_refused(doc, path, words):
    problems = _problems(doc)
    assert path in problems, problems
    assert words in problems[path]


def test_bad_settings_name_the_field():
    problems = _problems(_kv(manifest(), kvAware={"loadWeight": -1, "indexCapacity": 5}))
    assert "spec.router.kvAware.loadWeight" in problems
    assert "spec.router.kvAware.indexCapacity" in problems
    problems = _problems(_kv(manifest(), kvAware={"mode": "exact"}))
    assert (
        "spec.router.kvAware.mode" in problems and "precise" in problems["spec.router.kvAware.mode"]
    )


def _router_pod(plan) -> dict:
    from ascend_operator.render import render

    (deployment,) = [
        o
        for o in render(plan)
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("router")
    ]
    return deployment["spec"]["template"]["spec"]


def test_tokenizer_model_mounts_the_model_source_in_the_router_read_only():
    plan = plan_manifest(_kv(manifest(), kvAware={"mode": "precise", "tokenizer": "model"}))
    kv = plan.router.config.kv_aware
    assert kv.tokenizer == "/models/Qwen3-235B-A22B" and kv.tokenizer_revision is None
    pod = _router_pod(plan)
    engine_volumes = {v["name"]: v for v in pod["volumes"]}
    assert engine_volumes["model"] == {
        "name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}
    }  # fmt: skip
    (router,) = pod["containers"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in router["volumeMounts"]
    # ... as the engines mount it: the same path in both
    assert plan.role("unified").runtime_config.model_path == kv.tokenizer

    repo = {"id": "Qwen/Qwen3-235B-A22B", "revision": "abc123", "cache": {"claimName": "hf"}}
    source = {"pvc": None, "huggingFace": repo}
    hf = merge(manifest(), {"spec": {"model": {"source": source}}})
    plan = plan_manifest(_kv(hf, kvAware={"tokenizer": "model"}))
    kv = plan.router.config.kv_aware
    assert (kv.tokenizer, kv.tokenizer_revision) == ("Qwen/Qwen3-235B-A22B", "abc123")
    (router,) = _router_pod(plan)["containers"]
    env = {e["name"]: e.get("value") for e in router["env"]}
    assert env["HF_HOME"] == "/hf-cache" and env["HF_HUB_OFFLINE"] == "1"
    assert {"name": "hf-cache", "mountPath": "/hf-cache", "readOnly": True} in router[
        "volumeMounts"
    ]


def test_the_router_reads_no_model_unless_asked():
    for doc in (_kv(manifest()), _kv(manifest(), kvAware={"mode": "precise"}),
                _kv(load_example("tiny-sim.yaml"), kvAware={"tokenizer": "model"})):  # fmt: skip
        plan = plan_manifest(doc)
        assert plan.router.config.kv_aware.tokenizer is None
        pod = _router_pod(plan)
        assert {v["name"] for v in pod["volumes"]}.isdisjoint({"model", "hf-cache"})
