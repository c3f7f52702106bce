"""`ascend-serve operator`: run the kopf operator."""

from __future__ import annotations

import json
import logging
from typing import Any

LOG_FORMAT_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (structured logs for log pipelines)."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("k8s_skip", "k8s_ref"):
            if hasattr(record, key):
                payload[key] = str(getattr(record, key))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if logging.getLevelName(level) > logging.DEBUG:
        # kopf reports every indexer and event handler that succeeded, one line per watch
        # event of every child: keep that for DEBUG.
        logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, root.level))


def run_operator(
    *,
    namespaces: list[str],
    all_namespaces: bool,
    standalone: bool,
    peering: str | None,
    liveness: str | None,
    metrics_port: int | None,
    image_registry: str,
    log_level: str,
    log_format: str,
) -> int:
    import kopf
    from prometheus_client import start_http_server

    from . import handlers

    configure_logging(log_level, log_format)
    log = logging.getLogger("ascend_operator")
    if all_namespaces:
        log.info("watching ModelDeployments in every namespace")
    else:
        log.info("watching ModelDeployments in namespace(s): %s", ", ".join(namespaces))
    if metrics_port:
        start_http_server(metrics_port)
    kopf.run(
        standalone=standalone or not peering,
        peering_name=peering,
        liveness_endpoint=liveness,
        clusterwide=all_namespaces,
        namespaces=namespaces,
        memo=kopf.Memo(state=handlers.OperatorState(image_registry=image_registry)),
    )
    return 0


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def default_scope(
    env: dict[str, str], sa_namespace_file: str = SERVICE_ACCOUNT_NAMESPACE
) -> tuple[list[str], str]:
    """Namespaces to watch when no scope flag is given, and why: in a pod, its own namespace
    (POD_NAMESPACE, else the mounted ServiceAccount's); elsewhere, every namespace ([])."""
    if env.get("POD_NAMESPACE"):
        return [env["POD_NAMESPACE"]], "the pod's namespace (POD_NAMESPACE)"
    try:
        with open(sa_namespace_file, encoding="utf-8") as fh:
            namespace = fh.read().strip()
    except OSError:
        namespace = ""
    if namespace:
        return [namespace], "the namespace of the pod's ServiceAccount"
    return [], "not in a pod: every namespace"
