"""Router objects: ConfigMap, RBAC to watch EndpointSlices, Deployment, Service, PDB."""

from __future__ import annotations

import posixpath
from typing import Any

from ascend_runtime.engine_command import router_command

from ..planner import names
from ..planner.model_source import model_env
from ..planner.results import Plan
from . import labels as lbl
from .engine import CONFIG_DIR, meta, pod_disruption_budget, template_hash
from .model_volume import model_volume


def _rbac(plan: Plan) -> list[dict[str, Any]]:
    name = plan.router.name
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta(plan, name, "router"),
            "automountServiceAccountToken": True,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(plan, name, "router"),
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(plan, name, "router"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": plan.namespace}],
        },
    ]


def _deployment(plan: Plan) -> dict[str, Any]:
    router, spec = plan.router, plan.spec.router
    config_json = router.config.model_dump(mode="json")
    volumes: list[dict[str, Any]] = [{"name": "router-config", "configMap": {"name": router.name}}]
    mounts: list[dict[str, Any]] = [
        {"name": "router-config", "mountPath": CONFIG_DIR, "readOnly": True}
    ]
    kv = router.config.kv_aware
    reads_model = kv is not None and kv.tokenizer is not None
    if reads_model:  # the router loads the model's tokenizer (never its weights)
        model_volumes, model_mounts = model_volume(plan.spec)
        volumes += model_volumes
        mounts += model_mounts
    for entry, field in names.ROUTER_KEY_SECRETS.items():
        secret = getattr(spec, field)
        if secret:
            volumes.append({"name": entry, "secret": {"secretName": secret}})
            directory = posixpath.dirname(names.router_keys_file(entry))
            mounts.append({"name": entry, "mountPath": directory, "readOnly": True})
    resources: dict[str, Any] = {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    if spec.resources is not None:
        resources = {
            "requests": resources["requests"] | spec.resources.requests,
            "limits": resources["limits"] | spec.resources.limits,
        }
    get = {"path": "/health", "port": "http"}
    template: dict[str, Any] = {
        "metadata": {"labels": lbl.common(plan.name, "router")},
        "spec": {
            "serviceAccountName": router.name,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": lbl.selector(plan.name, "router")},
                            },
                        }
                    ]
                }
            },
            "containers": [
                {
                    "name": "router",
                    "image": router.image,
                    "command": router_command(f"{CONFIG_DIR}/router.json"),
                    "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
                    "env": [
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        *(
                            {"name": k, "value": v}
                            for k, v in (model_env(plan.spec) if reads_model else {}).items()
                        ),
                    ],
                    "resources": resources,
                    "readinessProbe": {"httpGet": get, "periodSeconds": 5, "failureThreshold": 2},
                    "livenessProbe": {"httpGet": get, "periodSeconds": 20, "failureThreshold": 3},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }
    template["metadata"]["annotations"] = {lbl.TEMPLATE_HASH: template_hash(template, config_json)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(plan, router.name, "router"),
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": lbl.selector(plan.name, "router")},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": template,
        },
    }


def router_objects(plan: Plan) -> list[dict[str, Any]]:
    router, spec = plan.router, plan.spec.router
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(plan, router.name, "router"),
            "data": {"router.json": router.config.model_dump_json(indent=2) + "\n"},
        },
        *_rbac(plan),
        _deployment(plan),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(plan, router.service_name, "router"),
            "spec": {
                "type": spec.service_type,
                "selector": lbl.selector(plan.name, "router"),
                "ports": [
                    {"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}
                ],
            },
        },
    ]
    pdb = pod_disruption_budget(plan, "router", router.replicas)
    if pdb:
        objs.append(pdb)
    return objs
