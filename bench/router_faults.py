"""Router under faults: a PD deployment (`ascend-serve up`, 2 prefill + 2 decode sim engines)
driven at concurrency 64 with streamed completions while faults are injected:

- idle gaps around the engines' 5 s keep-alive timeout between bursts;
- kill -9 of a decode instance, then of a prefill instance, each restarted on its port;
- SIGSTOP of a decode instance (frozen past the router's inter-token timeout), then SIGCONT;
- thousands of connections sending their bodies slowly, while normal requests go on.

Per scenario it records every request's outcome (complete; ended by an error event and
[DONE]; an HTTP error; cut without [DONE]; hung past the client's deadline), the requests in
flight on the victim when the fault hit, and the time until the router took a restarted
instance back. Prints a table and writes JSON under bench/results/.

    python bench/router_faults.py [--concurrency 64] [--slow-connections 4000]
    python bench/router_faults.py --tiny    # every scenario, small and short (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT / "tests")]

from _common import cpu_device, write_result  # noqa: E402

from procs import die_with_parent, engine_pids, up  # noqa: E402

SPEC = {
    "apiVersion": "ascendserve.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "faults"},
    "spec": {
        "model": {
            "name": "tiny",
            "source": {"hostPath": {"path": "/m"}},
            "maxModelLen": 4096,
            "architecture": {"preset": "tiny"},
        },
        "runtime": {
            "engine": "sim",
            "maxNumSeqs": 256,
            "maxNumBatchedTokens": 8192,
            "sim": {"fixedTtftMs": 5, "fixedItlMs": 5},
        },
        "roles": [
            {"name": "prefill", "replicas": 2},
            {"name": "decode"},
        ],
        "replicas": 2,
        "router": {"interTokenTimeoutSeconds": 5, "bodyTimeoutSeconds": 10},
    },
}
HUNG_SECONDS = 60.0
"""A request still open after this long counts as hung."""


def body(max_tokens: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": "a request under faults",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


async def one_request(session: aiohttp.ClientSession, url: str, max_tokens: int) -> str:
    """The outcome of one streamed completion."""

    async def run() -> str:
        async with session.post(f"{url}/v1/completions", json=body(max_tokens)) as r:
            if r.status != 200:
                await r.read()
                return f"http_{r.status}"
            error, done = False, False
            async for line in r.content:
                text = line.strip()
                if text == b"data: [DONE]":
                    done = True
                elif text.startswith(b"data: {") and b'"error"' in text[:16]:
                    error = True
            if not done:
                return "cut_without_done"
            return "error_event" if error else "ok"

    try:
        return await asyncio.wait_for(run(), HUNG_SECONDS)
    except TimeoutError:
        return "hung"
    except aiohttp.ClientError as exc:
        return f"exception_{type(exc).__name__}"


class Load:
    """A closed loop of `concurrency` workers until stopped."""

    def __init__(self, url: str, concurrency: int, max_tokens: int):
        self.url, self.concurrency, self.max_tokens = url, concurrency, max_tokens
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._session is not None
        await self._session.close()

    async def _worker(self) -> None:
        assert self._session is not None
        while not self._stop.is_set():
            self.outcomes[await one_request(self._session, self.url, self.max_tokens)] += 1


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def instance(url: str, role: str, index: int) -> dict[str, Any]:
    return (await get_json(f"{url}/instances"))[role][index]


def summary(outcomes: collections.Counter[str]) -> dict[str, Any]:
    errors = {k: v for k, v in outcomes.items() if k != "ok"}
    return {
        "requests": sum(outcomes.values()),
        "ok": outcomes.get("ok", 0),
        "errors": sum(v for k, v in errors.items() if k != "hung"),
        "hung": outcomes.get("hung", 0),
        "outcomes": dict(sorted(outcomes.items())),
    }


# --------------------------------------------------------------------------- scenarios


async def idle_gaps(url: str, concurrency: int, gaps: list[float]) -> dict[str, Any]:
    """Bursts of `concurrency` requests separated by idle gaps near the keep-alive timeout."""
    outcomes: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for gap in gaps:
            burst = await asyncio.gather(
                *(one_request(session, url, 8) for _ in range(concurrency))
            )
            outcomes.update(burst)
            await asyncio.sleep(gap)
        outcomes.update(
            await asyncio.gather(*(one_request(session, url, 8) for _ in range(concurrency)))
        )
    return {"gaps_seconds": gaps, **summary(outcomes)}


def _argv_env(pid: int) -> tuple[list[str], dict[str, str]]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        argv = [a.decode() for a in fh.read().split(b"\0") if a]
    with open(f"/proc/{pid}/environ", "rb") as fh:
        env = dict(e.decode().split("=", 1) for e in fh.read().split(b"\0") if b"=" in e)
    return argv, env


async def kill_and_restart(
    url: str, run_dir: Path, victim: str, concurrency: int, restarted: list[subprocess.Popen]
) -> dict[str, Any]:
    """kill -9 one engine under load; restart it on its port 2 s later; measure re-admission."""
    role, index, _ = victim.split("-")
    pid = engine_pids(run_dir)[victim]
    argv, env = _argv_env(pid)
    async with Load(url, concurrency, 64) as load:
        await asyncio.sleep(1.0)
        in_flight = (await instance(url, role, int(index)))["outstanding"]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.sleep(2.0)
        log = (run_dir / f"{victim}.restarted.log").open("wb")
        restarted.append(
            subprocess.Popen(die_with_parent(argv), env=env, stdout=log, stderr=subprocess.STDOUT)
        )
        started_at = time.monotonic()
        readmitted = None
        while time.monotonic() - started_at < 30:
            state = await instance(url, role, int(index))
            if state["healthy"]:
                readmitted = time.monotonic() - started_at
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # traffic flows to it again
        served_after = (await instance(url, role, int(index)))["served"]
    return {
        "victim": victim,
        "in_flight_on_victim_at_kill": in_flight,
        "down_seconds": round(started_at - killed_at, 2),
        "readmitted_seconds_after_restart": None if readmitted is None else round(readmitted, 2),
        "victim_served_total": served_after,
        **summary(load.outcomes),
    }


async def freeze(
    url: str, run_dir: Path, victim: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """SIGSTOP one engine under load for `seconds`, then SIGCONT."""
    role, index, _ = victim.split("-")
    pid = engine_pids(run_dir)[victim]
    async with Load(url, concurrency, 64) as load:
        await asyncio.sleep(1.0)
        in_flight = (await instance(url, role, int(index)))["outstanding"]
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
            ejected = not (await instance(url, role, int(index)))["healthy"]
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(2.0)
    return {
        "victim": victim,
        "frozen_seconds": seconds,
        "in_flight_on_victim_at_freeze": in_flight,
        "ejected_while_frozen": ejected,
        **summary(load.outcomes),
    }


def _open_slow(port: int, count: int) -> list[socket.socket]:
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 1000\r\n\r\n{"model": '
    )
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(head)
        socks.append(s)
    return socks


def _answered_408(sock: socket.socket) -> bool:
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        return sock.recv(64).startswith(b"HTTP/1.1 408")
    return False  # nothing yet


async def slowloris(url: str, connections: int, concurrency: int, seconds: float) -> dict[str, Any]:
    """Slow-body connections held open while normal requests go on."""
    port = int(url.rsplit(":", 1)[1])
    began = time.monotonic()
    socks = await asyncio.to_thread(_open_slow, port, connections)
    opened = time.monotonic() - began
    try:
        async with Load(url, concurrency, 8) as load:
            await asyncio.sleep(seconds)
        body_timeout = SPEC["spec"]["router"]["bodyTimeoutSeconds"]
        await asyncio.sleep(max(0.0, began + body_timeout - time.monotonic()))
        waiting, refused = list(socks), 0
        deadline = time.monotonic() + 10  # the answers of thousands take a moment
        while waiting and time.monotonic() < deadline:
            answered = [s for s in waiting if _answered_408(s)]
            refused += len(answered)
            waiting = [s for s in waiting if s not in answered]
            await asyncio.sleep(0.5)
    finally:
        for s in socks:
            s.close()
    return {
        "slow_connections": connections,
        "seconds_to_open_them": round(opened, 2),
        "slow_connections_answered_408": refused,
        "normal_requests": summary(load.outcomes),
        **{k: v for k, v in summary(load.outcomes).items() if k in ("errors", "hung")},
    }


# --------------------------------------------------------------------------- main


async def run_all(url: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    restarted: list[subprocess.Popen] = []
    results: dict[str, Any] = {}
    try:
        steps = [
            ("idle_gaps", lambda: idle_gaps(url, args.concurrency, args.gaps)),
            ("kill_decode", lambda: kill_and_restart(
                url, run_dir, "decode-0-0", args.concurrency, restarted)),
            ("kill_prefill", lambda: kill_and_restart(
                url, run_dir, "prefill-0-0", args.concurrency, restarted)),
            ("sigstop_decode", lambda: freeze(
                url, run_dir, "decode-1-0", args.concurrency, args.freeze_seconds)),
            ("slowloris", lambda: slowloris(
                url, args.slow_connections, max(1, args.concurrency // 8), args.slow_seconds)),
        ]  # fmt: skip
        for name, step in steps:
            row = await step()
            results[name] = row
            shown = {k: v for k, v in row.items() if k != "outcomes"}
            print(
                f"{name:<15} errors {row['errors']:>4}  hung {row['hung']:>3}  {json.dumps(shown)}"
            )
    finally:
        for proc in restarted:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--gaps", type=float, nargs="+", default=[4.0, 4.5, 5.0, 5.5, 6.0])
    parser.add_argument("--freeze-seconds", type=float, default=15.0)
    parser.add_argument("--slow-connections", type=int, default=4000)
    parser.add_argument("--slow-seconds", type=float, default=8.0)
    parser.add_argument("--tiny", action="store_true", help="small and short, for CI")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "router_faults.json"))
    args = parser.parse_args()
    if args.tiny:
        args.concurrency, args.gaps, args.freeze_seconds = 8, [5.0], 12.0
        args.slow_connections, args.slow_seconds = 64, 2.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * args.slow_connections + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # `up` and the router inherit it
    run_dir = Path(tempfile.mkdtemp(prefix="bench-router-faults-"))
    spec_path = run_dir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    with up(spec_path, run_dir) as (url, _proc, _out):
        results = asyncio.run(run_all(url, run_dir, args))
    write_result(
        args.output,
        {
            "benchmark": "router_faults",
            "device": cpu_device("client, router and 4 sim engines share them"),
            "deployment": "PD: 2 prefill + 2 decode sim engines (5 ms TTFT, 5 ms/token), "
            "router interTokenTimeoutSeconds 5, bodyTimeoutSeconds 10",
            "concurrency": args.concurrency,
            "request": body(64) | {"note": "8 tokens in idle_gaps and slowloris"},
            "hung_after_seconds": HUNG_SECONDS,
            "goal": "0 hung everywhere; 0 errors in idle_gaps and slowloris; errors only for "
            "requests in flight on a killed or frozen instance",
            "tiny": args.tiny,
            "scenarios": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
