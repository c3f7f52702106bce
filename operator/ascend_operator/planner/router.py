"""Planning the router Deployment: its RouterConfig, Service name and endpoint."""

from __future__ import annotations

from collections.abc import Sequence

from ascend_runtime.config import RouterBackends, RouterConfig
from ascend_runtime.roles import ENGINE_HTTP_PORT

from .. import images
from ..api.resource import ModelDeployment
from . import kv_aware, names
from .results import ClusterInfo, RolePlan, RouterPlan


def plan_router(
    md: ModelDeployment, pd: bool, cluster: ClusterInfo, role_plans: Sequence[RolePlan] = ()
) -> RouterPlan:
    spec, name, namespace = md.spec, md.metadata.name, md.metadata.namespace
    router = spec.router
    roles = [r.name for r in spec.roles]
    config = RouterConfig(
        deployment=name,
        served_model_name=spec.model.name,
        mode="pd" if pd else "unified",
        port=router.port,
        policy=router.policy,
        kv_aware=kv_aware.routing(spec, role_plans),
        backends=RouterBackends(
            source="kubernetes",
            namespace=namespace,
            services={role: names.role_service(name, role) for role in roles},
            engine_port=ENGINE_HTTP_PORT,
        ),
        api_keys_file=names.router_keys_file("api-keys") if router.api_keys_secret else None,
        admin_keys_file=names.router_keys_file("admin-keys") if router.admin_keys_secret else None,
        max_request_bytes=router.max_request_bytes,
        max_concurrent_requests=router.max_concurrent_requests,
        request_timeout_seconds=router.request_timeout_seconds,
        first_token_timeout_seconds=router.first_token_timeout_seconds,
        inter_token_timeout_seconds=router.inter_token_timeout_seconds,
        body_timeout_seconds=router.body_timeout_seconds,
        prefill_retries=router.prefill_retries,
        max_model_len=spec.model.max_model_len,
    )
    service = names.router_service(name)
    return RouterPlan(
        name=names.router(name),
        service_name=service,
        replicas=router.replicas,
        image=router.image or images.cpu_runtime_image(cluster.image_registry),
        config=config,
        endpoint=f"http://{service}.{namespace}.svc:{router.port}",
    )
