"""The namespace kubectl would use: the current context's namespace from the kubeconfig
(`$KUBECONFIG`, a path list merged first-wins as kubectl does, else ~/.kube/config)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def current_namespace(env: dict[str, str] | None = None) -> str | None:
    """The current context's namespace, or None (no kubeconfig, no context, none set)."""
    env = dict(os.environ) if env is None else env
    paths = [Path(p) for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if not paths:
        paths = [Path(env.get("HOME", str(Path.home()))) / ".kube" / "config"]
    current: str | None = None
    contexts: dict[str, dict[str, Any]] = {}
    for path in paths:
        doc = _load(path)
        current = current or doc.get("current-context") or None
        for entry in doc.get("contexts") or []:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                contexts.setdefault(entry["name"], entry.get("context") or {})
    if current is None:
        return None
    namespace = (contexts.get(current) or {}).get("namespace")
    return namespace if isinstance(namespace, str) and namespace else None
