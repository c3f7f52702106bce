"""Every Kubernetes kind the operator touches, in one list: the watches, the API client's
resource table and the chart's RBAC rules are all derived from it."""

from __future__ import annotations

from dataclasses import dataclass

from .api.resource import GROUP, KIND, PLURAL, VERSION

OWNED_VERBS = ("list", "watch", "create", "patch", "delete")
"""Children: watched (list, watch), server-side applied (patch, or create where new), pruned."""


@dataclass(frozen=True)
class Kind:
    """Where objects of one kind live in the API, and what the operator does with them."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True
    verbs: tuple[str, ...] = OWNED_VERBS

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def resource(self) -> str:
        """kopf's resource spec: `plural.version.group` (`plural.version` for the core group)."""
        return ".".join(p for p in (self.plural, self.version, self.group) if p)

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


CHILDREN: tuple[Kind, ...] = (
    Kind("v1", "ConfigMap", "configmaps"),
    Kind("v1", "Service", "services"),
    Kind("v1", "ServiceAccount", "serviceaccounts"),
    Kind("apps/v1", "Deployment", "deployments"),
    Kind("apps/v1", "StatefulSet", "statefulsets"),
    Kind("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "leaderworkersets"),
    Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
    Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
)
"""What the renderer may create for a ModelDeployment (a test keeps the two in step)."""

WORKLOAD_KINDS = ("LeaderWorkerSet", "StatefulSet")

REFERENCED_KINDS = ("ConfigMap", "ServiceAccount", "Role", "Service", "PodDisruptionBudget")
"""Applied in a first wave, before what refers to them (pods mount the ConfigMaps and run as
the ServiceAccount, a RoleBinding names its Role); each wave's objects go out concurrently."""

MODEL_DEPLOYMENT = Kind(f"{GROUP}/{VERSION}", KIND, PLURAL, verbs=("get", "list", "watch", "patch"))
MODEL_DEPLOYMENT_STATUS = Kind(f"{GROUP}/{VERSION}", KIND, f"{PLURAL}/status", verbs=("patch",))
EVENT = Kind("v1", "Event", "events", verbs=("create",))
CRD = Kind(
    "apiextensions.k8s.io/v1",
    "CustomResourceDefinition",
    "customresourcedefinitions",
    namespaced=False,
    verbs=("list", "watch"),
)
"""kopf watches resource definitions; the operator learns from that watch whether the
LeaderWorkerSet CRD is installed."""
ENDPOINT_SLICE = Kind(
    "discovery.k8s.io/v1", "EndpointSlice", "endpointslices", verbs=("get", "list", "watch")
)
"""Held, never called: the router's Role grants it, and RBAC lets a subject grant only what it
holds itself (the escalation check)."""
NAMESPACE = Kind("v1", "Namespace", "namespaces", namespaced=False, verbs=("list", "watch"))
"""kopf lists and watches namespaces when it serves named namespaces."""
KOPF_PEERING = Kind(
    "kopf.dev/v1", "KopfPeering", "kopfpeerings", verbs=("get", "list", "watch", "patch")
)
CLUSTER_KOPF_PEERING = Kind(
    "kopf.dev/v1",
    "ClusterKopfPeering",
    "clusterkopfpeerings",
    namespaced=False,
    verbs=("get", "list", "watch", "patch"),
)

BY_KIND: dict[str, Kind] = {k.kind: k for k in (*CHILDREN, MODEL_DEPLOYMENT, EVENT, CRD)}
"""The API client's resource table."""

NAMESPACED_GRANTS: tuple[Kind, ...] = (
    MODEL_DEPLOYMENT,
    MODEL_DEPLOYMENT_STATUS,
    *CHILDREN,
    ENDPOINT_SLICE,
    EVENT,
    KOPF_PEERING,
)
"""What the operator needs in each namespace it serves (a Role there, or a ClusterRole)."""


def rbac_rules(kinds: tuple[Kind, ...]) -> list[dict[str, list[str]]]:
    """RBAC rules granting exactly `kinds`' verbs, kinds with equal verbs and group merged."""
    rules: list[dict[str, list[str]]] = []
    for kind in kinds:
        for rule in rules:
            if rule["apiGroups"] == [kind.group] and rule["verbs"] == list(kind.verbs):
                rule["resources"].append(kind.plural)
                break
        else:
            rules.append(
                {"apiGroups": [kind.group], "resources": [kind.plural], "verbs": list(kind.verbs)}
            )
    return rules


def _yaml_rules(rules: list[dict[str, list[str]]]) -> str:
    def flow(items: list[str]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    return "\n".join(
        f"- apiGroups: {flow(r['apiGroups'])}\n"
        f"  resources: {flow(r['resources'])}\n"
        f"  verbs: {flow(r['verbs'])}"
        for r in rules
    )


def chart_rules_template() -> str:
    """`charts/ascend-serve/templates/_rules.tpl`: the chart's RBAC rules as Helm helpers,
    generated from this module (`make crd` writes it; a test fails when it drifts)."""
    parts = [
        "{{/* Generated by `ascend-serve chart-rbac` from ascend_operator/kinds.py: do not edit.",
        "Exactly the calls the operator makes (a test records them on a real API server). */}}",
    ]
    for name, kinds in (
        ("namespacedRules", NAMESPACED_GRANTS),
        ("discoveryRules", (CRD,)),
        ("namespaceRules", (NAMESPACE,)),
        ("clusterPeeringRules", (CLUSTER_KOPF_PEERING,)),
    ):
        parts += [
            f'{{{{- define "ascend-serve.{name}" -}}}}',
            _yaml_rules(rbac_rules(kinds)),
            "{{- end -}}",
        ]
    return "\n".join(parts) + "\n"
