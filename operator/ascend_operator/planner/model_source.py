"""Where the model's files are inside the pods that read them (engines, and routers that
tokenize): its path or Hugging Face id, and the environment that reading it needs."""

from __future__ import annotations

from ..api.spec import ModelDeploymentSpec
from . import names


def model_env(spec: ModelDeploymentSpec) -> dict[str, str]:
    """What a process that reads the model needs in its environment (a Hugging Face cache,
    read offline)."""
    if spec.model.source.hugging_face is not None:
        return {"HF_HOME": names.HF_CACHE, "HF_HUB_OFFLINE": "1"}
    return {}


def model_path(spec: ModelDeploymentSpec) -> str:
    source = spec.model.source
    if source.pvc is not None:
        sub = source.pvc.path.strip("/")
        return f"{names.MODEL_MOUNT}/{sub}" if sub else names.MODEL_MOUNT
    if source.hugging_face is not None:
        return source.hugging_face.id
    return names.MODEL_MOUNT  # hostPath (or no source, already reported as a problem)
