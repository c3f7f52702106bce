"""`ascend-serve router`: serve the router of one deployment."""

from __future__ import annotations

import logging

from .. import serving
from ..config import RouterConfig
from .app import Router

log = logging.getLogger("ascend_runtime.router")


def run_router(
    config_path: str, host: str = "0.0.0.0", port: int | None = None, health_interval: float = 2.0
) -> int:
    with open(config_path, encoding="utf-8") as fh:
        config = RouterConfig.model_validate_json(fh.read())

    async def main() -> None:
        router = Router(config, health_interval=health_interval)
        server = serving.make_server(router.app, host, port or config.port)
        log.info(
            "router for %s (%s mode) on %s:%d",
            config.served_model_name,
            config.mode,
            host,
            port or config.port,
        )
        await serving.serve([server], router.start, router.stop)

    serving.run(main())
    return 0
