"""`ascend-serve sim`: run one pod's sim engine (the leader serves; workers stand by)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from .. import serving
from ..config import RuntimeConfig
from .server import SimServer

log = logging.getLogger("ascend_runtime.sim")


async def _worker(config: RuntimeConfig, instance: int, worker_index: int) -> None:
    """A non-leader pod of a multi-pod instance: like a headless vLLM worker it serves no
    HTTP; it lives until told to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "sim worker %d of %s-%s instance %d standing by",
        worker_index,
        config.deployment,
        config.role,
        instance,
    )
    await stop.wait()


async def _leader(
    config: RuntimeConfig, instance: int, host: str, port: int, kv_port: int | None
) -> None:
    host_ip = os.environ.get("VLLM_HOST_IP") or os.environ.get("POD_IP") or "127.0.0.1"
    server = SimServer(config, instance, host_ip, kv_port, bind_host=host)
    servers = [serving.make_server(server.api, host, port)]
    log.info(
        "sim engine %s serving %s on %s:%d", server.engine_id, config.served_model_name, host, port
    )
    await serving.serve(servers, server.start, server.stop)


def run_sim(
    config_path: str,
    instance: int,
    worker_index: int,
    *,
    host: str = "0.0.0.0",
    port: int | None = None,
    kv_port: int | None = None,
) -> int:
    with open(config_path, encoding="utf-8") as fh:
        config = RuntimeConfig.model_validate_json(fh.read())
    if worker_index > 0:
        serving.run(_worker(config, instance, worker_index))
    else:
        serving.run(_leader(config, instance, host, port or config.http_port, kv_port))
    return 0
