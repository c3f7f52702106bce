"""Engine objects of one role: ConfigMap, LeaderWorkerSet or StatefulSets (+ headless Service),
role Service, PodDisruptionBudget."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from ascend_runtime.config import PodIdentity
from ascend_runtime.engine_command import engine_command
from ascend_runtime.roles import ENGINE_HTTP_PORT, KV_EVENTS_PORT, KV_EVENTS_REPLAY_PORT

from ..planner import names
from ..planner.results import Plan, RolePlan
from . import labels as lbl
from .model_volume import model_volume

CONFIG_DIR = names.CONFIG_DIR

RUNTIME_JSON = f"{CONFIG_DIR}/runtime.json"

DRIVER_MOUNTS: tuple[tuple[str, str, str], ...] = (
    ("ascend-dcmi", "/usr/local/dcmi", "Directory"),
    ("ascend-npu-smi", "/usr/local/bin/npu-smi", "File"),
    ("ascend-driver-lib64", "/usr/local/Ascend/driver/lib64", "Directory"),
    ("ascend-driver-version", "/usr/local/Ascend/driver/version.info", "File"),
    ("ascend-install-info", "/etc/ascend_install.info", "File"),
    ("ascend-hccn-conf", "/etc/hccn.conf", "File"),
)
"""Host files the Ascend runtime inside the container needs (name, path, hostPath type)."""


def meta(plan: Plan, name: str, component: str, **extra: Any) -> dict[str, Any]:
    """Object metadata with our labels and, when the plan knows the owner's uid, its owner
    reference (so deletion cascades through garbage collection, no finalizer needed)."""
    out: dict[str, Any] = {
        "name": name,
        "namespace": plan.namespace,
        "labels": lbl.common(plan.name, component),
    }
    if plan.uid:
        out["ownerReferences"] = [
            {
                "apiVersion": "ascendserve.dev/v1alpha1",
                "kind": "ModelDeployment",
                "name": plan.name,
                "uid": plan.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    out.update(extra)
    return out


def command_preview(role: RolePlan) -> str:
    """What each pod of instance 0 will run, made by the launcher's own function."""
    config = role.runtime_config
    lines = [
        "# Informational: the launcher derives each pod's command from runtime.json with the",
        "# same function. $(POD_IP) is the pod's IP, $(LEADER_IP) the IP of worker 0; instance",
        "# i differs only in the Mooncake engine_id suffix.",
    ]
    for pod in role.pods:
        ident = PodIdentity(
            instance=0,
            worker_index=pod.worker_index,
            pod_ip="$(POD_IP)",
            leader_address="$(POD_IP)" if pod.leader else "$(LEADER_IP)",
        )
        cmd = engine_command(config, ident, RUNTIME_JSON)
        lines.append(
            f"\n# worker {pod.worker_index} (dp ranks {list(pod.dp_ranks)}, "
            f"{pod.devices} devices{', leader' if pod.leader else ''})"
        )
        lines += [f"export {k}={json.dumps(v)}" for k, v in sorted(cmd.env.items())]
        lines.append(_format_argv(cmd.argv))
    return "\n".join(lines) + "\n"


def _format_argv(argv: list[str]) -> str:
    """One flag (with its value) per line, shell-quoted."""
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg.startswith("--") and groups[-1]:
            groups.append([])
        groups[-1].append(_quote(arg))
    return " \\\n  ".join(" ".join(g) for g in groups)


def _quote(arg: str) -> str:
    safe = all(c.isalnum() or c in "-_./:=$()," for c in arg)
    return arg if safe else "'" + arg.replace("'", "'\\''") + "'"


def configmap(plan: Plan, role: RolePlan) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(plan, role.configmap_name, role.name),
        "data": {
            "runtime.json": role.runtime_config.model_dump_json(indent=2) + "\n",
            "commands.sh": command_preview(role),
        },
    }


def _volumes(plan: Plan, role: RolePlan) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = plan.spec
    volumes: list[dict[str, Any]] = [
        {"name": "runtime-config", "configMap": {"name": role.configmap_name}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "runtime-config", "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    shm = spec.hardware.shm_size if spec.hardware else "1Gi"
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    model_volumes, model_mounts = model_volume(spec)
    volumes += model_volumes
    mounts += model_mounts
    if spec.hardware is not None and spec.hardware.mount_driver:
        for name, path, kind in DRIVER_MOUNTS:
            volumes.append({"name": name, "hostPath": {"path": path, "type": kind}})
            mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts


def _resources(plan: Plan, role: RolePlan) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    role_spec = next(r for r in plan.spec.roles if r.name == role.name)
    if role_spec.resources is not None:
        requests |= role_spec.resources.requests
        limits |= role_spec.resources.limits
    resource = plan.hardware.resource_name
    if resource:
        # Extended resources: requests must equal limits.
        requests[resource] = str(role.devices_per_pod)
        limits[resource] = str(role.devices_per_pod)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = dict(sorted(requests.items()))
    if limits:
        out["limits"] = dict(sorted(limits.items()))
    return out


def _http_probes() -> dict[str, Any]:
    get = {"path": "/health", "port": "http"}
    return {
        # Loading a 235B model and capturing graphs can take most of an hour.
        "startupProbe": {"httpGet": get, "periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": {"httpGet": get, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": get,
            "periodSeconds": 30,
            "timeoutSeconds": 10,
            "failureThreshold": 5,
        },
    }


def _exec_probes() -> dict[str, Any]:
    # One template serves leader and workers of a StatefulSet: the probe command asks the
    # engine for /health on the leader and checks the local engine process on workers.
    probe = {"exec": {"command": ["ascend-serve", "probe", "--config", RUNTIME_JSON]}}
    return {
        "startupProbe": {
            **probe,
            "periodSeconds": 10,
            "failureThreshold": 360,
            "timeoutSeconds": 5,
        },
        "readinessProbe": {
            **probe,
            "periodSeconds": 10,
            "failureThreshold": 3,
            "timeoutSeconds": 5,
        },
        "livenessProbe": {
            **probe,
            "periodSeconds": 30,
            "timeoutSeconds": 10,
            "failureThreshold": 5,
        },
    }


def pod_template(
    plan: Plan, role: RolePlan, *, probes: dict[str, Any] | None, instance: int | None
) -> dict[str, Any]:
    """Pod template of a role's engine pods. `instance` is fixed for StatefulSets and read
    from the LeaderWorkerSet group index otherwise."""
    spec = plan.spec
    volumes, mounts = _volumes(plan, role)
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    if instance is None:
        env.append(
            {
                "name": "ASCEND_SERVE_INSTANCE",
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.labels['{lbl.LWS_GROUP_INDEX}']"}
                },
            }
        )
    else:
        env.append({"name": "ASCEND_SERVE_INSTANCE", "value": str(instance)})
    container: dict[str, Any] = {
        "name": "engine",
        "image": role.image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": ["ascend-serve", "launch", "--config", RUNTIME_JSON],
        "env": env,
        "ports": [{"name": "http", "containerPort": ENGINE_HTTP_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
    }
    if role.runtime_config.sim.kv_events is not None:  # kv-aware routers subscribe here
        container["ports"] += [
            {"name": "kv-events", "containerPort": KV_EVENTS_PORT, "protocol": "TCP"},
            {"name": "kv-replay", "containerPort": KV_EVENTS_REPLAY_PORT, "protocol": "TCP"},
        ]
    resources = _resources(plan, role)
    if resources:
        container["resources"] = resources
    if probes:
        container.update(probes)
    pod_labels = lbl.common(plan.name, role.name)
    if instance is not None:
        pod_labels[lbl.INSTANCE_LABEL] = str(instance)
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": spec.workload.termination_grace_period_seconds,
    }
    if spec.hardware is not None:
        if spec.hardware.node_selector:
            pod_spec["nodeSelector"] = dict(spec.hardware.node_selector)
        if spec.hardware.tolerations:
            pod_spec["tolerations"] = [t.wire() for t in spec.hardware.tolerations]
    if spec.workload.scheduler_name:
        pod_spec["schedulerName"] = spec.workload.scheduler_name
    if spec.workload.priority_class_name:
        pod_spec["priorityClassName"] = spec.workload.priority_class_name
    return {"metadata": {"labels": pod_labels}, "spec": pod_spec}


def template_hash(*parts: Any) -> str:
    """Hash of pod templates plus the runtime config: a change to either rolls the pods."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stamp(template: dict[str, Any], digest: str) -> dict[str, Any]:
    stamped = copy.deepcopy(template)
    stamped["metadata"].setdefault("annotations", {})[lbl.TEMPLATE_HASH] = digest
    return stamped


def leaderworkerset(plan: Plan, role: RolePlan) -> dict[str, Any]:
    size = role.pods_per_instance
    config = role.runtime_config.model_dump(mode="json")
    leader = pod_template(plan, role, probes=_http_probes(), instance=None)
    group: dict[str, Any] = {"size": size, "restartPolicy": "RecreateGroupOnPodRestart"}
    if size > 1:
        worker = pod_template(plan, role, probes=None, instance=None)
        digest = template_hash(leader, worker, config)
        group["leaderTemplate"] = _stamp(leader, digest)
        group["workerTemplate"] = _stamp(worker, digest)
    else:
        digest = template_hash(leader, config)
        group["workerTemplate"] = _stamp(leader, digest)
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": meta(plan, role.workload_name, role.name),
        "spec": {
            "replicas": role.instances,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {
                    "maxUnavailable": plan.spec.workload.max_unavailable,
                    "maxSurge": 0,
                },
            },
            "leaderWorkerTemplate": group,
        },
    }


def statefulsets(plan: Plan, role: RolePlan) -> list[dict[str, Any]]:
    """One StatefulSet per instance; ordinal 0 leads; a shared headless Service names pods."""
    config = role.runtime_config.model_dump(mode="json")
    out = []
    for instance in range(role.instances):
        template = pod_template(plan, role, probes=_exec_probes(), instance=instance)
        digest = template_hash(template, config)
        sel = lbl.selector(plan.name, role.name) | {lbl.INSTANCE_LABEL: str(instance)}
        out.append(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": meta(
                    plan, names.instance_statefulset(plan.name, role.name, instance), role.name
                ),
                "spec": {
                    "replicas": role.pods_per_instance,
                    "serviceName": role.workload_name,
                    "podManagementPolicy": "Parallel",
                    "updateStrategy": {"type": "RollingUpdate"},
                    "selector": {"matchLabels": sel},
                    "template": _stamp(template, digest),
                },
            }
        )
    return out


def headless_service(plan: Plan, role: RolePlan) -> dict[str, Any]:
    """Gives StatefulSet pods DNS names, ready or not (workers resolve their leader early)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(plan, role.workload_name, role.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": lbl.selector(plan.name, role.name),
            "ports": [{"name": "http", "port": ENGINE_HTTP_PORT, "targetPort": "http"}],
        },
    }


def role_service(plan: Plan, role: RolePlan) -> dict[str, Any]:
    """ClusterIP Service over the role's instance leaders; its EndpointSlices feed the router."""
    leader = (
        {lbl.LWS_WORKER_INDEX: "0"}
        if plan.workload_kind == "LeaderWorkerSet"
        else {lbl.STS_POD_INDEX: "0"}
    )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(plan, role.service_name, role.name),
        "spec": {
            "type": "ClusterIP",
            "selector": lbl.selector(plan.name, role.name) | leader,
            "ports": [
                {"name": "http", "port": ENGINE_HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def pod_disruption_budget(
    plan: Plan, component: str, instances: int, max_unavailable: int = 1
) -> dict[str, Any] | None:
    """At most `max_unavailable` pods (so at most that many instances) disrupted at once (for
    engine roles, the bound the rollout keeps); none when a single instance would make node
    drains block forever."""
    if instances < 2:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(plan, names.pdb(plan.name, component), component),
        "spec": {
            "maxUnavailable": max_unavailable,
            "selector": {"matchLabels": lbl.selector(plan.name, component)},
        },
    }


def role_objects(plan: Plan, role: RolePlan) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = [configmap(plan, role)]
    if plan.workload_kind == "LeaderWorkerSet":
        objs.append(leaderworkerset(plan, role))
    else:
        objs.append(headless_service(plan, role))
        objs += statefulsets(plan, role)
    objs.append(role_service(plan, role))
    pdb = pod_disruption_budget(plan, role.name, role.instances, plan.spec.workload.max_unavailable)
    if pdb:
        objs.append(pdb)
    return objs
