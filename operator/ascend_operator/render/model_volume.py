"""The model's volume and mount, as every pod that reads the model has them (engines, and
routers that load its tokenizer)."""

from __future__ import annotations

from typing import Any

from ..api.spec import ModelDeploymentSpec
from ..planner import names


def model_volume(spec: ModelDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod volumes and container mounts (read-only) of the model source."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    source = spec.model.source
    if source.pvc is not None:
        volumes.append(
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True},
            }
        )
        mounts.append({"name": "model", "mountPath": names.MODEL_MOUNT, "readOnly": True})
    elif source.host_path is not None:
        volumes.append(
            {"name": "model", "hostPath": {"path": source.host_path.path, "type": "Directory"}}
        )
        mounts.append({"name": "model", "mountPath": names.MODEL_MOUNT, "readOnly": True})
    elif source.hugging_face is not None:
        cache = source.hugging_face.cache
        if cache.claim_name:
            volumes.append(
                {
                    "name": "hf-cache",
                    "persistentVolumeClaim": {"claimName": cache.claim_name, "readOnly": True},
                }
            )
        else:
            volumes.append(
                {"name": "hf-cache", "hostPath": {"path": cache.host_path, "type": "Directory"}}
            )
        mounts.append({"name": "hf-cache", "mountPath": names.HF_CACHE, "readOnly": True})
    return volumes, mounts
