"""`ascend-serve up`: every pod of a plan as a local process, plus the router.

The plan is the one the operator would apply; each engine pod becomes a process (the sim
engine unless `--engine vllm`), the leaders listen on free loopback ports, and the router on
localhost serves the OpenAI API with static membership. Ctrl-C or SIGTERM stops everything;
a process that dies is reported with its log.

With real vLLM, what a pod gets from Kubernetes comes from this machine instead: the model
directory of a hostPath source (not the in-pod mount), loopback instead of the pod IP, a free
block of KV ports per instance (pods each have their own network namespace; processes here
share one), and the KV transport the engine's environment has installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ascend_runtime.config import KvEventsEndpoint, PodIdentity, RouterBackends
from ascend_runtime.engine_command import Listen, engine_command, router_command
from ascend_runtime.roles import Role

from .local_setup import (
    LOOPBACK,
    check_kv_aware,
    engine_has_mooncake,
    free_port_block,
    local_kv_events,
    local_model_path,
    local_vllm_config,
    local_vllm_events,
    port_free,
    vllm_executable,
)
from .planner.results import Plan

__all__ = ["LocalDeployment", "LocalProcess", "local_processes", "run_up"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclasses.dataclass
class LocalProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    url: str | None = None
    popen: subprocess.Popen[bytes] | None = None
    reported: bool = False


def _self_command() -> tuple[str, ...]:
    exe = shutil.which("ascend-serve")
    return (exe,) if exe else (sys.executable, "-m", "ascend_operator.cli")


def local_processes(
    plan: Plan,
    run_dir: Path,
    engine: str,
    router_port: int,
    transport: str = "tcp",
) -> tuple[list[LocalProcess], LocalProcess]:
    """The engine processes and the router process of a plan (nothing started). With
    `engine="vllm"`, `transport` is the KV transport ascend-serve's connector uses."""
    run_dir.mkdir(parents=True, exist_ok=True)
    engines: list[LocalProcess] = []
    members: dict[str, list[str]] = {}
    device_cursor = 0
    model_path = local_model_path(plan) if engine == "vllm" else ""
    hf = plan.spec.model.source.hugging_face
    revision = hf.revision if hf is not None else None
    vllm = shutil.which("vllm") or "vllm"  # run_up says what to do when it is missing
    # Every port picked here is claimed in `taken` (none is bound until its process starts,
    # so the OS could hand the same free port out twice).
    taken: set[int] = {router_port}
    events: dict[str, KvEventsEndpoint] = {}
    check_kv_aware(plan, engine)
    for role in plan.roles:
        config = role.runtime_config.model_copy(update={"engine": engine})
        role_config_path = run_dir / f"{role.name}.json"
        role_config_path.write_text(config.model_dump_json(indent=2))
        for instance in range(role.instances):
            port = free_port_block(1, taken)
            url = f"http://{LOOPBACK}:{port}"
            members.setdefault(role.name, []).append(url)
            config_path = role_config_path
            if config.sim.kv_events is not None and engine == "sim":
                # every instance publishes on its own pair of ports (one network here)
                config_path = run_dir / f"{role.name}-{instance}.json"
                events[url] = local_kv_events(config, config_path, taken)
            kv_port = free_port_block(1, taken) if role.name == Role.PREFILL else None
            instance_config = config
            if engine == "vllm":
                # every rank of every instance serves KV on its own port (one network here)
                topo = config.topology
                ranks = topo.data * topo.ranks_devices
                base = free_port_block(ranks, taken) if config.kv_transfer else None
                instance_config = local_vllm_config(config, model_path, base, transport)
                instance_config, where = local_vllm_events(instance_config, taken)
                if where is not None:
                    events[url] = where
            for pod in role.pods:
                ident = PodIdentity(
                    instance=instance,
                    worker_index=pod.worker_index,
                    pod_ip=LOOPBACK,
                    leader_address=LOOPBACK,
                )
                name = f"{role.name}-{instance}-{pod.worker_index}"
                cmd = engine_command(
                    instance_config.model_copy(update={"engine": engine}),
                    ident,
                    str(config_path),
                    listen=Listen(LOOPBACK, port, kv_port if engine == "sim" else None),
                    program=_self_command(),
                    vllm=vllm,
                )
                env = dict(cmd.env)
                if engine == "vllm":
                    devices = list(range(device_cursor, device_cursor + pod.devices))
                    device_cursor += pod.devices
                    env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(map(str, devices))
                argv = cmd.argv
                engines.append(
                    LocalProcess(
                        name, argv, env, run_dir / f"{name}.log", url if pod.leader else None
                    )
                )
    kv = plan.router.config.kv_aware
    if kv is not None and kv.hashing == "vllm":
        # The model is on this machine: the router tokenizes with its tokenizer files.
        kv = kv.model_copy(update={"tokenizer": model_path, "tokenizer_revision": revision})
    router_config = plan.router.config.model_copy(
        update={
            "kv_aware": kv,
            "port": router_port,
            "backends": RouterBackends(source="static", static=members, kv_events=events),
            "api_keys_file": None,  # the Secrets are a cluster's; `up` serves loopback only
            "admin_keys_file": None,
        }
    )
    router_path = run_dir / "router.json"
    router_path.write_text(router_config.model_dump_json(indent=2))
    router = LocalProcess(
        "router",
        router_command(
            str(router_path),
            Listen(LOOPBACK, router_port),
            health_interval=1.0,
            program=_self_command(),
        ),
        {},
        run_dir / "router.log",
        f"http://{LOOPBACK}:{router_port}",
    )
    return engines, router


def _terminate_with_parent() -> Callable[[], None] | None:
    """A hook for the child before exec (Linux): SIGTERM when `up` dies, even by SIGKILL, so
    no engine outlives it holding ports and memory. None where prctl is missing. libc is loaded
    here, in the parent: the hook itself only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


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

    def start(self, ready_timeout: float = 60.0, stop: Callable[[], bool] = lambda: False) -> None:
        """Engines first, then the router once every leader answers /health (so it starts
        with every instance in rotation). `stop` returning true (a signal arrived) ends the
        wait: engines can take minutes to start, and Ctrl-C must not wait for them."""
        began = time.monotonic()
        deadline = began + ready_timeout
        hook = _terminate_with_parent()
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
                        preexec_fn=hook,  # noqa: PLW1509 (up starts no threads)
                    )
            pending = [p for p in group if p.url]
            while pending:
                if stop():
                    raise RuntimeError("stopped before every process was ready")
                dead = [p for p in self.check() if p.url]
                if dead:
                    proc = dead[0]
                    raise RuntimeError(
                        f"{proc.name} exited before it became healthy; last "
                        f"lines of {proc.log}:\n{_tail(proc.log)}"
                    )
                ready = [p for p in pending if _healthy(p.url or "")]
                for proc in ready:
                    self.out.write(
                        f"ascend-serve up: {proc.name} ready after "
                        f"{time.monotonic() - began:.1f} s\n"
                    )
                    self.out.flush()
                pending = [p for p in pending if p not in ready]
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
    transport = "tcp"
    if not dry_run and not port_free(router_port):
        out.write(
            f"ascend-serve up: port {router_port} on {LOOPBACK} is in use (another `ascend-serve "
            "up`?); stop what holds it or pass --port\n"
        )
        return 1
    if engine == "vllm" and not dry_run:
        vllm_executable()  # a clear error now rather than a failed start later
    uses_ours = any(
        r.runtime_config.kv_transfer and r.runtime_config.kv_transfer.module_path
        for r in plan.roles
    )
    if engine == "vllm" and uses_ours:  # ascend-serve's connector picks its transport
        has_mooncake = engine_has_mooncake(vllm_executable())
        transport = "mooncake" if has_mooncake else "tcp"
        why = "installed" if has_mooncake else "Mooncake is not installed in vLLM's environment"
        out.write(f"ascend-serve up: KV transfer over {transport} ({why})\n")
    engines, router = local_processes(plan, directory, engine, router_port, transport)
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
            deployment.start(ready_timeout, lambda: bool(stop_requested))
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
