"""Property-based tests: random specs never crash the planner, and every accepted plan
renders objects whose device counts add up."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ascend_operator.planner import PlanError, plan_manifest
from ascend_operator.planner.architectures import PRESETS
from ascend_operator.planner.capabilities import RUNTIME_LINES
from ascend_operator.render import render

POWERS = st.sampled_from([1, 2, 4, 8, 16])


@st.composite
def parallelism(draw):
    par = {
        "tensor": draw(POWERS),
        "pipeline": draw(st.sampled_from([1, 1, 2])),
        "data": draw(st.integers(1, 8)),
        "expert": draw(st.booleans()),
        "prefillContext": draw(st.sampled_from([1, 1, 2])),
        "decodeContext": draw(st.sampled_from([1, 1, 2, 4])),
    }
    local = draw(st.sampled_from([None, 1, 2, 4]))
    if local is not None:
        par["dataLocal"] = local
    return par


@st.composite
def role(draw, name):
    out = {"name": name, "parallelism": draw(parallelism())}
    if draw(st.booleans()):
        out["graphMode"] = draw(st.sampled_from(["aclgraph", "torchair", "eager"]))
    if name == "prefill" and draw(st.booleans()):
        out["replicas"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        out["maxNumSeqs"] = draw(st.sampled_from([8, 48, 256]))
    if draw(st.booleans()):
        out["kvPort"] = draw(st.sampled_from([20000, 30000, 36000, 65000]))
    return out


@st.composite
def manifests(draw):
    engine = draw(st.sampled_from(["vllm", "sim"]))
    runtime = {
        "engine": engine,
        "version": draw(st.sampled_from([f"{line}.0" for line in RUNTIME_LINES])),
        "graphMode": draw(st.sampled_from(["aclgraph", "torchair", "eager"])),
        "cudagraphMode": draw(st.sampled_from(["FULL_DECODE_ONLY", "PIECEWISE"])),
        "fusedMc2": draw(st.booleans()),
        "asyncScheduling": draw(st.booleans()),
    }
    if draw(st.booleans()):
        runtime["speculative"] = {"numSpeculativeTokens": draw(st.integers(1, 15))}
    if draw(st.booleans()):
        runtime["captureSizes"] = draw(st.lists(st.integers(1, 512), min_size=1, max_size=6))
    if draw(st.booleans()):
        runtime["hcclBufferSizeMb"] = draw(st.sampled_from([100, 512, 1024, 4096]))
    if draw(st.booleans()):
        runtime["maxNumBatchedTokens"] = draw(st.sampled_from([256, 4096, 16384]))
    pd = draw(st.booleans())
    roles = [draw(role("prefill")), draw(role("decode"))] if pd else [draw(role("unified"))]
    spec = {
        "model": {
            "name": "m",
            "source": {"pvc": {"claimName": "models", "path": "m"}},
            "quantization": draw(st.sampled_from(["none", "w8a8"])),
            "architecture": {"preset": draw(st.sampled_from(sorted(PRESETS)))},
        },
        "runtime": runtime,
        "roles": roles,
        "replicas": draw(st.integers(0, 4)),
    }
    if engine == "vllm" or draw(st.booleans()):
        spec["hardware"] = {"profile": draw(st.sampled_from(["A2", "A3"]))}
    return {
        "apiVersion": "ascendserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": draw(st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)),
            "namespace": "ns",
        },
        "spec": spec,
    }


def _pods(obj):
    if obj["kind"] == "LeaderWorkerSet":
        group = obj["spec"]["leaderWorkerTemplate"]
        leader = group.get("leaderTemplate", group["workerTemplate"])
        workers = group["size"] - 1
        per_instance = [leader] + [group["workerTemplate"]] * workers
        return per_instance * obj["spec"]["replicas"]
    if obj["kind"] == "StatefulSet":
        return [obj["spec"]["template"]] * obj["spec"]["replicas"]
    return []


@given(manifests(), st.booleans())
def test_planner_never_crashes_and_devices_add_up(doc, lws):
    from ascend_operator.api import ModelDeployment
    from ascend_operator.planner import ClusterInfo
    from ascend_operator.planner.plan import plan

    try:
        md = ModelDeployment.from_manifest(doc)
        p = plan(md, ClusterInfo(lws_available=lws))
    except PlanError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.path.startswith(("spec", "metadata")) and problem.fix
        return
    objs = render(p)
    resource = p.hardware.resource_name
    requested = 0
    for obj in objs:
        for template in _pods(obj):
            limits = template["spec"]["containers"][0].get("resources", {}).get("limits", {})
            devices = int(limits.get(resource, 0)) if resource else 0
            assert devices <= p.hardware.devices_per_node
            requested += devices
    expected = (
        sum(r.instances * r.runtime_config.topology.data * r.ranks_devices for r in p.roles)
        if resource
        else 0
    )
    assert requested == expected == p.total_devices
    for obj in objs:
        assert len(obj["metadata"]["name"]) <= 63


@given(manifests())
def test_plan_manifest_reports_problems_never_raises_otherwise(doc):
    try:
        plan_manifest(doc)
    except PlanError as exc:
        assert str(exc).startswith("1. ")


@st.composite
def plausible_manifests(draw):
    """Specs that break no rule: the planner must accept every one of them."""
    profile = draw(st.sampled_from(["A2", "A3"]))
    per_node = 8 if profile == "A2" else 16
    preset = draw(st.sampled_from(sorted(PRESETS)))
    moe = bool(PRESETS[preset].num_experts)

    arch = PRESETS[preset]
    kv = None if arch.mla else arch.num_kv_heads

    def splits_heads(t: int) -> bool:  # vLLM's rule: TP divides the heads; KV heads and TP nest
        nested = not kv or (t % kv if t >= kv else kv % t) == 0
        return arch.num_attention_heads % t == 0 and nested

    def par(max_tp):
        sizes = [t for t in (1, 2, 4, 8, 16) if t <= min(per_node, max_tp) and splits_heads(t)]
        tp = draw(st.sampled_from(sizes))
        return {
            "tensor": tp,
            "data": draw(st.integers(1, 8)),
            "expert": moe and draw(st.booleans()),
        }

    if draw(st.booleans()):
        prefill = par(16)
        decode = par(prefill["tensor"])
        roles = [
            {
                "name": "prefill",
                "graphMode": "eager",
                "parallelism": prefill,
                "replicas": draw(st.integers(0, 3)),
            },
            {"name": "decode", "parallelism": decode},
        ]
    else:
        roles = [{"name": "unified", "parallelism": par(16)}]
    return {
        "apiVersion": "ascendserve.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "ok", "namespace": "ns"},
        "spec": {
            "model": {
                "name": "m",
                "source": {"hostPath": {"path": "/m"}},
                "architecture": {"preset": preset},
            },
            "runtime": {"graphMode": draw(st.sampled_from(["aclgraph", "eager"]))},
            "hardware": {"profile": profile},
            "roles": roles,
            "replicas": draw(st.integers(0, 4)),
        },
    }


@given(plausible_manifests())
def test_plausible_specs_are_accepted(doc):
    p = plan_manifest(doc)
    for role in p.roles:
        assert role.devices_per_pod <= p.hardware.devices_per_node
        assert role.pods_per_instance * role.runtime_config.topology.data_local == (
            role.runtime_config.topology.data
        )
