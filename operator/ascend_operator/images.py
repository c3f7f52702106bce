"""Default container images. The registry is one constant so a site can retag in one place
(and the operator/CLI can override it with --image-registry)."""

from __future__ import annotations

from . import __version__

DEFAULT_REGISTRY = "docker.io/ascendserve"


def npu_runtime_image(
    vllm_ascend_version: str, profile: str, registry: str = DEFAULT_REGISTRY
) -> str:
    """Our NPU runtime image: vllm-ascend `version` plus the ascend-serve runtime."""
    version = (
        vllm_ascend_version if vllm_ascend_version.startswith("v") else f"v{vllm_ascend_version}"
    )
    suffix = "-a3" if profile == "A3" else ""
    return f"{registry}/runtime-npu:{__version__}-vllm-ascend-{version}{suffix}"


def cpu_runtime_image(registry: str = DEFAULT_REGISTRY) -> str:
    """The small CPU-only image: router and sim engine."""
    return f"{registry}/runtime-cpu:{__version__}"
