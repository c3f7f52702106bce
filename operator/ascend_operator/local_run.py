"""`ascend-serve up`: every pod of a plan as a local process, plus the router.

The plan is the one the operator would apply; each engine pod becomes a process (the sim
engine unless `--engine vllm`), the leaders listen on free loopback ports, and the router on
localhost serves the OpenAI API with static membership. Ctrl-C or SIGTERM stops everything;
a process that dies is reported with its log.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO

from ascend_runtime.config import PodIdentity, RouterBackends
from ascend_runtime.engine_command import engine_command

from .planner.plan import Plan

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class LocalProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    url: str | None = None
    popen: subprocess.Popen[bytes] | None = None
    reported: bool = False


def _self_command() -> list[str]:
    exe = shutil.which("ascend-serve")
    return [exe] if exe else [sys.executable, "-m", "ascend_operator.cli"]


def local_processes(
    plan: Plan,
    run_dir: Path,
    engine: str,
    router_port: int,
) -> tuple[list[LocalProcess], LocalProcess]:
    """The engine processes and the router process of a plan (nothing started)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    engines: list[LocalProcess] = []
    members: dict[str, list[str]] = {}
    device_cursor = 0
    for role in plan.roles:
        config = role.runtime_config.model_copy(update={"engine": engine})
        config_path = run_dir / f"{role.name}.json"
        config_path.write_text(config.model_dump_json(indent=2))
        for instance in range(role.instances):
            port = free_port()
            url = f"http://{LOOPBACK}:{port}"
            members.setdefault(role.name, []).append(url)
            kv_port = free_port() if role.name == "prefill" else None
            for pod in role.pods:
                ident = PodIdentity(
                    instance=instance,
                    worker_index=pod.worker_index,
                    pod_ip=LOOPBACK,
                    leader_address=LOOPBACK,
                )
                name = f"{role.name}-{instance}-{pod.worker_index}"
                if engine == "sim":
                    argv = [
                        *_self_command(),
                        "sim",
                        "--config",
                        str(config_path),
                        "--instance",
                        str(instance),
                        "--worker-index",
                        str(pod.worker_index),
                        "--host",
                        LOOPBACK,
                        "--port",
                        str(port),
                    ]
                    if kv_port:
                        argv += ["--kv-port", str(kv_port)]
                    env = {"VLLM_HOST_IP": LOOPBACK}
                else:
                    cmd = engine_command(config, ident, str(config_path))
                    argv = _with_port(cmd.argv, port)
                    env = dict(cmd.env)
                    devices = list(range(device_cursor, device_cursor + pod.devices))
                    device_cursor += pod.devices
                    env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(map(str, devices))
                engines.append(
                    LocalProcess(
                        name, argv, env, run_dir / f"{name}.log", url if pod.leader else None
                    )
                )
    router_config = plan.router.config.model_copy(
        update={
            "port": router_port,
            "backends": RouterBackends(source="static", static=members),
            "api_keys_file": None,
        }
    )
    router_path = run_dir / "router.json"
    router_path.write_text(router_config.model_dump_json(indent=2))
    router = LocalProcess(
        "router",
        [
            *_self_command(),
            "router",
            "--config",
            str(router_path),
            "--host",
            LOOPBACK,
            "--port",
            str(router_port),
            "--health-interval",
            "1",
        ],
        {},
        run_dir / "router.log",
        f"http://{LOOPBACK}:{router_port}",
    )
    return engines, router


def _with_port(argv: list[str], port: int) -> list[str]:
    out = list(argv)
    if "--port" in out:
        out[out.index("--port") + 1] = str(port)
    return out


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class LocalDeployment:
    """Starts, watches and stops the processes of one `up`."""

    def __init__(self, engines: list[LocalProcess], router: LocalProcess, out: TextIO):
        self.engines, self.router, self.out = engines, router, out
        self.stopping = False

    @property
    def processes(self) -> list[LocalProcess]:
        return [*self.engines, self.router]

    def start(self, ready_timeout: float = 60.0) -> None:
        """Engines first, then the router once every leader answers /health (so it starts
        with every instance in rotation)."""
        deadline = time.monotonic() + ready_timeout
        for group in (self.engines, [self.router]):
            for proc in group:
                with proc.log.open("wb") as log:
                    proc.popen = subprocess.Popen(
                        proc.argv,
                        env={**os.environ, **proc.env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
            pending = [p for p in group if p.url]
            while pending:
                dead = [p for p in self.check() if p.url]
                if dead:
                    proc = dead[0]
                    raise RuntimeError(
                        f"{proc.name} exited before it became healthy; last "
                        f"lines of {proc.log}:\n{_tail(proc.log)}"
                    )
                pending = [p for p in pending if not _healthy(p.url or "")]
                if pending and time.monotonic() > deadline:
                    names = ", ".join(f"{p.name} (log {p.log})" for p in pending)
                    raise RuntimeError(f"not healthy after {ready_timeout:g} s: {names}")
                time.sleep(0.1)

    def check(self) -> list[LocalProcess]:
        """Report processes that died (once each); returns them."""
        dead = []
        for proc in self.processes:
            if proc.popen and proc.popen.poll() is not None:
                dead.append(proc)
                if not proc.reported and not self.stopping:
                    proc.reported = True
                    self.out.write(
                        f"ascend-serve up: {proc.name} exited with code "
                        f"{proc.popen.returncode}; log: {proc.log}\n"
                    )
                    self.out.flush()
        return dead

    def stop(self, grace: float = 10.0) -> None:
        self.stopping = True
        for proc in self.processes:
            if proc.popen and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes:
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


def run_up(
    plan: Plan,
    *,
    engine: str,
    router_port: int,
    run_dir: str | None,
    dry_run: bool,
    out: TextIO,
    ready_timeout: float = 60.0,
) -> int:
    """Run a plan locally until interrupted; returns the exit code."""
    directory = (
        Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix=f"ascend-serve-{plan.name}-"))
    )
    engines, router = local_processes(plan, directory, engine, router_port)
    if dry_run:
        for proc in [*engines, router]:
            env = " ".join(f"{k}={v}" for k, v in sorted(proc.env.items()))
            out.write(f"{proc.name}: {env} {' '.join(proc.argv)}\n".replace(":  ", ": "))
        return 0
    deployment = LocalDeployment(engines, router, out)
    stop_requested: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            deployment.start(ready_timeout)
        except RuntimeError as exc:
            out.write(f"ascend-serve up: {exc}\n")
            return 1
        total = sum(r.total_pods for r in plan.roles)
        out.write(
            f"ascend-serve up: {plan.name} is serving {plan.spec.model.name} "
            f"({total} engine process(es), {engine} engine, logs in {directory})\n"
            f"endpoint: {router.url}/v1\n"
        )
        out.flush()
        while not stop_requested:
            dead = deployment.check()
            if router in dead:
                out.write("ascend-serve up: the router died; stopping\n")
                return 1
            time.sleep(0.2)
        out.write("ascend-serve up: stopping\n")
        return 0
    finally:
        deployment.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
