"""Rendered objects: valid Kubernetes, NPU counts, probes, selectors, owner references,
rollout hashes, and the StatefulSet fallback."""

from __future__ import annotations

import copy

import pytest

from ascend_operator.api import ModelDeployment
from ascend_operator.planner import ClusterInfo, plan, plan_manifest
from ascend_operator.render import render
from helpers import example_paths, load_example, manifest

kubernetes_validate = pytest.importorskip("kubernetes_validate")


def objects(doc, lws=True, uid=None):
    doc = copy.deepcopy(doc)
    if uid:
        doc["metadata"]["uid"] = uid
    return render(plan(ModelDeployment.from_manifest(doc), ClusterInfo(lws_available=lws)))


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def pod_templates(obj):
    if obj["kind"] == "LeaderWorkerSet":
        group = obj["spec"]["leaderWorkerTemplate"]
        return [t for k, t in group.items() if k.endswith("Template")]
    return [obj["spec"]["template"]]


@pytest.mark.parametrize("lws", [True, False], ids=["lws", "statefulset"])
@pytest.mark.parametrize("path", example_paths(), ids=lambda p: p.name)
def test_objects_are_valid_kubernetes(path, lws):
    import yaml

    for obj in objects(yaml.safe_load(path.read_text()), lws=lws):
        if obj["kind"] == "LeaderWorkerSet":
            for template in pod_templates(obj):
                kubernetes_validate.validate(
                    {
                        "apiVersion": "v1",
                        "kind": "PodTemplate",
                        "metadata": {"name": "t"},
                        "template": template,
                    },
                    "1.34",
                    strict=True,
                )
        else:
            kubernetes_validate.validate(obj, "1.34", strict=True)


def test_invalid_object_is_caught_by_the_validator():
    # The validator above must be able to fail: a misspelt field is rejected.
    obj = by_kind(objects(load_example("tiny-sim.yaml")), "Service")[0]
    obj["spec"]["selectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, "1.34", strict=True)


def test_lws_shape_probes_and_npus():
    objs = objects(load_example("qwen3-235b-pd.yaml"))
    lws = {o["metadata"]["name"]: o for o in by_kind(objs, "LeaderWorkerSet")}
    decode = lws["qwen3-235b-pd-decode"]["spec"]
    group = decode["leaderWorkerTemplate"]
    assert decode["replicas"] == 1 and group["size"] == 2
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = group["leaderTemplate"]["spec"]["containers"][0]
    worker = group["workerTemplate"]["spec"]["containers"][0]
    assert "readinessProbe" in leader and "startupProbe" in leader
    assert not any(k.endswith("Probe") for k in worker)
    for c in (leader, worker):
        assert c["resources"]["requests"]["huawei.com/ascend-1980"] == "16"
        assert c["resources"]["limits"]["huawei.com/ascend-1980"] == "16"
        assert c["command"] == [
            "ascend-serve",
            "launch",
            "--config",
            "/etc/ascend-serve/runtime.json",
        ]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {
            "/dev/shm",
            "/models",
            "/usr/local/dcmi",
            "/etc/hccn.conf",
            "/usr/local/Ascend/driver/lib64",
        } <= mounts
    prefill = lws["qwen3-235b-pd-prefill"]["spec"]["leaderWorkerTemplate"]
    assert prefill["size"] == 1 and "leaderTemplate" not in prefill
    assert "readinessProbe" in prefill["workerTemplate"]["spec"]["containers"][0]


def test_role_service_selects_leaders_and_router_watches_it():
    objs = objects(load_example("qwen3-235b-pd.yaml"))
    services = {o["metadata"]["name"]: o for o in by_kind(objs, "Service")}
    decode = services["qwen3-235b-pd-decode-http"]["spec"]["selector"]
    assert decode["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert decode["ascendserve.dev/role"] == "decode"
    import json

    router_cm = next(
        o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == "qwen3-235b-pd-router"
    )
    config = json.loads(router_cm["data"]["router.json"])
    assert config["mode"] == "pd"
    assert config["backends"]["services"] == {
        "prefill": "qwen3-235b-pd-prefill-http",
        "decode": "qwen3-235b-pd-decode-http",
    }
    assert services["qwen3-235b-pd"]["spec"]["selector"]["ascendserve.dev/role"] == "router"
    role = by_kind(objs, "Role")[0]
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]


def test_owner_references_only_with_uid():
    assert all("ownerReferences" not in o["metadata"] for o in objects(manifest()))
    for obj in objects(manifest(), uid="1234"):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == "1234" and ref["controller"] and ref["kind"] == "ModelDeployment"


def _hashes(objs):
    return {
        o["metadata"]["name"]: t["metadata"]["annotations"]["ascendserve.dev/template-hash"]
        for o in objs
        if o["kind"] in ("LeaderWorkerSet", "StatefulSet", "Deployment")
        for t in pod_templates(o)
    }


def test_template_hash_rolls_on_spec_change_only():
    base = _hashes(objects(manifest()))
    assert _hashes(objects(manifest())) == base
    scaled = _hashes(objects(manifest(replicas=3)))
    assert scaled == base  # scaling does not roll pods
    changed = _hashes(objects(manifest(runtime={"maxNumSeqs": 32})))
    assert changed["m-unified"] != base["m-unified"]
    assert changed["m-router"] == base["m-router"]


def test_statefulset_fallback():
    doc = load_example("qwen3-235b-multi-node.yaml")
    doc["spec"]["replicas"] = 2
    objs = objects(doc, lws=False)
    stss = by_kind(objs, "StatefulSet")
    assert [s["metadata"]["name"] for s in stss] == [
        "qwen3-235b-2n-unified-0",
        "qwen3-235b-2n-unified-1",
    ]
    for i, sts in enumerate(stss):
        spec = sts["spec"]
        assert spec["replicas"] == 2 and spec["serviceName"] == "qwen3-235b-2n-unified"
        assert spec["podManagementPolicy"] == "Parallel"
        container = spec["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ASCEND_SERVE_INSTANCE"] == str(i)
        assert container["readinessProbe"]["exec"]["command"][:2] == ["ascend-serve", "probe"]
    headless = next(s for s in by_kind(objs, "Service") if s["spec"].get("clusterIP") == "None")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    http = next(
        s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "qwen3-235b-2n-unified-http"
    )
    assert http["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"
    pdbs = by_kind(objs, "PodDisruptionBudget")
    assert [p["metadata"]["name"] for p in pdbs] == ["qwen3-235b-2n-unified"]


def test_sim_without_hardware_has_no_npu_or_driver():
    objs = objects(load_example("tiny-sim.yaml"))
    (lws,) = by_kind(objs, "LeaderWorkerSet")
    container = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    assert "resources" not in container
    assert not any(m["mountPath"].startswith("/usr/local") for m in container["volumeMounts"])
    assert container["image"].endswith("/runtime-cpu:0.1.0")


def test_device_counts_add_up():
    p = plan_manifest(load_example("qwen3-235b-pd.yaml"))
    objs = render(p)
    total = 0
    for lws in by_kind(objs, "LeaderWorkerSet"):
        spec = lws["spec"]
        group = spec["leaderWorkerTemplate"]
        per_pod = int(
            pod_templates(lws)[0]["spec"]["containers"][0]["resources"]["limits"][
                "huawei.com/ascend-1980"
            ]
        )
        total += spec["replicas"] * group["size"] * per_pod
    assert total == p.total_devices == 48


def test_api_keys_secret_mounted():
    objs = objects(manifest(router={"apiKeysSecret": "keys", "replicas": 2}))
    (dep,) = by_kind(objs, "Deployment")
    vols = dep["spec"]["template"]["spec"]["volumes"]
    assert {"name": "api-keys", "secret": {"secretName": "keys"}} in vols
    assert [p["metadata"]["name"] for p in by_kind(objs, "PodDisruptionBudget")] == ["m-router"]


def test_strings_yaml_12_reads_as_numbers_are_quoted():
    """kubectl reads YAML 1.2: an all-digit template hash with a leading zero must stay a
    string (it came out unquoted once and the API server refused the int)."""
    import yaml

    from ascend_operator.render import to_yaml

    text = to_yaml([{"h": "0271197214080670", "f": "1e5", "x": "0x1f", "s": "abc"}])
    assert yaml.safe_load(text) == {"h": "0271197214080670", "f": "1e5", "x": "0x1f", "s": "abc"}
    assert "h: '0271197214080670'" in text and "s: abc" in text
