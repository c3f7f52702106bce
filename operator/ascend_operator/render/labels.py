"""Labels and selectors of rendered objects (app.kubernetes.io conventions plus ours)."""

from __future__ import annotations

from .. import __version__

DEPLOYMENT_LABEL = "ascendserve.dev/deployment"
ROLE_LABEL = "ascendserve.dev/role"
INSTANCE_LABEL = "ascendserve.dev/instance"
TEMPLATE_HASH = "ascendserve.dev/template-hash"
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
STS_POD_INDEX = "apps.kubernetes.io/pod-index"
MANAGED_BY = "ascend-serve-operator"


def common(deployment: str, component: str) -> dict[str, str]:
    """Labels on every object (and pod) of a deployment's component (a role or `router`)."""
    name = "ascend-serve-router" if component == "router" else "ascend-serve-engine"
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": deployment,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "ascend-serve",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/version": __version__,
        DEPLOYMENT_LABEL: deployment,
        ROLE_LABEL: component,
    }


def selector(deployment: str, component: str) -> dict[str, str]:
    """Stable selector of a component's pods (no version: selectors are immutable)."""
    return {DEPLOYMENT_LABEL: deployment, ROLE_LABEL: component}


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
