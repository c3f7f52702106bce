"""Router faults on real processes (`ascend-serve up`, sim engines; the faults are injected:
a connection the engine drops, slow and oversized bodies, a frozen engine), plus the stale
keep-alive race against an in-process engine emulator that drops reused connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from helpers import load_example
from procs import up

BODY = {"model": "tiny", "prompt": "fault tolerance", "max_tokens": 4, "temperature": 0}


def with_spec(example: str, tmp_path, router: dict | None = None, **runtime) -> object:
    spec = load_example(example)
    spec["spec"]["runtime"].update(runtime)
    spec["spec"].setdefault("router", {}).update(router or {})
    path = tmp_path / f"fault-{example}"
    path.write_text(yaml.safe_dump(spec))
    return path


def metric_value(url: str, sample: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --------------------------------------------------------------------------- keep-alive race


async def _dropping_engine(requests_seen: list[str]) -> asyncio.Server:
    """An HTTP/1.1 engine that keeps connections alive but closes one, unanswered, when a
    second request arrives on it: what uvicorn does when its idle timeout fires just as the
    router reuses the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next(
                    (int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length")),
                    0,
                )
                await reader.readexactly(length)
                if answered:
                    writer.close()
                    return
                requests_seen.append(lines[0])
                body = b'{"ok":true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_a_request_on_a_connection_the_engine_closed_is_retried_on_a_fresh_one():
    from ascend_runtime.config import RouterBackends, RouterConfig
    from ascend_runtime.router.app import Router

    async def scenario() -> tuple[list[int], list[str], Router]:
        seen: list[str] = []
        server = await _dropping_engine(seen)
        port = server.sockets[0].getsockname()[1]
        config = RouterConfig(
            deployment="t",
            served_model_name="tiny",
            mode="unified",
            backends=RouterBackends(
                source="static", static={"unified": [f"http://127.0.0.1:{port}"]}
            ),
        )
        router = Router(config, health_interval=3600)
        await router.start()
        transport = httpx.ASGITransport(app=router.app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
                codes = [
                    (await client.post("/v1/completions", json=BODY)).status_code for _ in range(5)
                ]
        finally:
            await router.stop()
            server.close()
        return codes, seen, router

    codes, seen, router = asyncio.run(scenario())
    assert codes == [200] * 5
    assert seen.count("POST /v1/completions HTTP/1.1") == 5
    backend = router.pool.members("unified")[0]
    assert backend.available and backend.consecutive_failures == 0
    retried = router.metrics.retries.labels("unified")._value.get()
    assert retried >= 2  # each reuse of a pooled connection was dropped and sent again


# --------------------------------------------------------------------------- bodies


def _raw_request(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode())
    return sock


def _status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def test_slow_bodies_hold_no_slot_and_time_out(tmp_path):
    path = with_spec(
        "tiny-sim.yaml", tmp_path, router={"maxConcurrentRequests": 4, "bodyTimeoutSeconds": 3}
    )
    with up(path, tmp_path) as (url, _proc, _out):
        port = int(url.rsplit(":", 1)[1])
        head = (
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            'content-length: 100\r\n\r\n{"model"'
        )
        slow = [_raw_request(port, head) for _ in range(24)]  # 6x the concurrency limit
        time.sleep(0.5)
        for _ in range(8):  # normal requests still get slots
            r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=30)
            assert r.status_code == 200, r.text
        assert [_status_of(s) for s in slow] == [408] * 24
        for s in slow:
            s.close()
        sample = 'ascend_serve_router_requests_total{code="408",route="/v1/completions"}'
        assert metric_value(url, sample) == 24


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def _router_pid(run_dir) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if str(run_dir / "router.json").encode() in fh.read():
                        return int(entry)
            except OSError:
                continue
    raise AssertionError("router process not found")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the router's memory from /proc")
def test_an_oversized_chunked_body_is_refused_before_it_is_buffered(tmp_path):
    with up("tiny-sim.yaml", tmp_path) as (url, _proc, _out):
        pid = _router_pid(tmp_path)
        before = _rss_kib(pid)
        port = int(url.rsplit(":", 1)[1])
        sock = _raw_request(
            port,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n",
        )
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
        for _ in range(8):  # 8 MiB, past the 4 MiB limit
            sock.sendall(chunk)
        # the refusal is already there, before the body ends
        assert select.select([sock], [], [], 10)[0], "no answer while the body was still open"
        assert _status_of(sock) == 413
        with contextlib.suppress(OSError):  # the rest is read and dropped, or refused
            for _ in range(56):  # 64 MiB in all
                sock.sendall(chunk)
        sock.close()
        assert _rss_kib(pid) - before < 32 * 1024
        assert httpx.post(f"{url}/v1/completions", json=BODY).status_code == 200


# --------------------------------------------------------------------------- frozen engine


def _engine_pids(run_dir) -> dict[str, int]:
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if str(run_dir / "unified.json").encode() in argv and b"--port" in argv:
            pids[argv[argv.index(b"--port") + 1].decode()] = int(entry)
    return pids


def _stream(url: str, started: threading.Semaphore) -> tuple[list[str], list[dict]]:
    body = {**BODY, "max_tokens": 2000, "stream": True}
    lines, errors = [], []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                if not lines:
                    started.release()
                lines.append(line)
                if line != "data: [DONE]" and "error" in json.loads(line[6:]):
                    errors.append(json.loads(line[6:])["error"])
    return lines, errors


def test_a_frozen_engine_ends_its_streams_and_loses_its_traffic(tmp_path):
    path = with_spec(
        "tiny-sim.yaml",
        tmp_path,
        router={"interTokenTimeoutSeconds": 2},
        sim={"fixedItlMs": 5},
    )
    with up(path, tmp_path) as (url, _proc, _out):
        pids = _engine_pids(tmp_path)
        assert len(pids) == 2
        with ThreadPoolExecutor(6) as pool:
            started = threading.Semaphore(0)
            streams = [pool.submit(_stream, url, started) for _ in range(6)]
            for _ in streams:  # every stream is under way (3 on each engine) before the freeze
                assert started.acquire(timeout=30)
            frozen = next(iter(pids.values()))
            os.kill(frozen, signal.SIGSTOP)
            try:
                started = time.monotonic()
                results = [f.result(timeout=60) for f in streams]
                ended = time.monotonic() - started
                after = [
                    httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).status_code
                    for _ in range(6)
                ]
            finally:
                os.kill(frozen, signal.SIGCONT)
        cut = [(lines, errors) for lines, errors in results if errors]
        done = [lines for lines, errors in results if not errors]
        assert cut and done, [len(lines) for lines, _ in results]
        for lines, errors in cut:
            assert "failed mid-stream" in errors[0]["message"]
            assert lines[-1] == "data: [DONE]"
        assert ended < 30  # the inter-token timeout, not the 600 s request timeout
        assert after == [200] * 6
