"""Run one or more ASGI apps with uvicorn in one event loop until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn


def make_server(app: Any, host: str, port: int, log_level: str = "warning") -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        proxy_headers=False,  # nothing here reads the client's address
        interface="asgi3",  # apps may be bound methods, which uvicorn cannot inspect
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


async def serve(
    servers: list[uvicorn.Server],
    on_start: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until any server exits (a signal makes them all exit)."""
    if on_start:
        await on_start()
    try:
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        if on_stop:
            await on_stop()


def run(coro: Awaitable[None]) -> None:
    import uvloop

    uvloop.run(coro)  # type: ignore[arg-type]
