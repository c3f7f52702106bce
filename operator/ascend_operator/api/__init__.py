"""API models of ascendserve.dev/v1alpha1 (the CRD schema is generated from them)."""

from .resource import API_VERSION, GROUP, KIND, PLURAL, SHORT_NAMES, VERSION, ModelDeployment
from .spec import ModelDeploymentSpec, RoleSpec
from .status import Condition, ModelDeploymentStatus, RoleStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "VERSION",
    "Condition",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
    "RoleSpec",
    "RoleStatus",
]
