"""Names of every object the renderer creates, in one place."""

from __future__ import annotations


def role_workload(deployment: str, role: str) -> str:
    """LeaderWorkerSet of a role (and, with StatefulSets, their shared headless Service)."""
    return f"{deployment}-{role}"


def instance_statefulset(deployment: str, role: str, instance: int) -> str:
    """StatefulSet of one instance (fallback workload); its ordinal 0 is the leader."""
    return f"{deployment}-{role}-{instance}"


def role_service(deployment: str, role: str) -> str:
    """ClusterIP Service over a role's instance leaders (what the router watches)."""
    return f"{deployment}-{role}-http"


def runtime_configmap(deployment: str, role: str) -> str:
    return f"{deployment}-{role}-runtime"


def router(deployment: str) -> str:
    """Router Deployment, ConfigMap, ServiceAccount, Role and RoleBinding."""
    return f"{deployment}-router"


def router_service(deployment: str) -> str:
    """The front door: `http://<deployment>.<namespace>.svc:<port>`."""
    return deployment


def pdb(deployment: str, component: str) -> str:
    return f"{deployment}-{component}"


MODEL_MOUNT = "/models"
"""Where engine pods mount the model (a PVC or a hostPath directory)."""

HF_CACHE = "/hf-cache"
"""Where engine pods mount a Hugging Face cache (HF_HOME) holding the model."""

CONFIG_DIR = "/etc/ascend-serve"
"""Where engine and router pods mount their configuration."""

ROUTER_KEY_SECRETS = {"api-keys": "api_keys_secret", "admin-keys": "admin_keys_secret"}
"""Secret entry (also its volume's name) -> the spec.router field naming the Secret."""


def router_keys_file(entry: str) -> str:
    """Where the router reads the keys of one Secret entry (`api-keys`, `admin-keys`)."""
    return f"{CONFIG_DIR}/{entry}/{entry}"
