"""The launcher (`ascend-serve launch`): the first process of every engine pod.

It reads the role's RuntimeConfig, works out who this pod is from the workload's environment
(LeaderWorkerSet variables, or the StatefulSet ordinal in the pod name), waits for the
leader's DNS name with a bounded budget, and execs the engine so that signals reach it and
its exit code is the pod's.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import TextIO

from .config import PodIdentity, RuntimeConfig
from .engine_command import EngineCommand, engine_command

Resolver = Callable[[str], str]


class LaunchError(RuntimeError):
    """The pod cannot start its engine; the message says why and what to check."""


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not value.isdigit():
        raise LaunchError(f"{name}={value!r} is not a non-negative integer")
    return int(value)


def _pod_ip(env: Mapping[str, str]) -> str:
    ip = env.get("POD_IP")
    if ip:
        return ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        raise LaunchError("POD_IP is not set and this host's name does not resolve") from exc


def worker_position(config: RuntimeConfig, env: Mapping[str, str]) -> tuple[int, int, str | None]:
    """(instance, worker index, leader DNS name or None on the leader) from the workload."""
    topo, leader = config.topology, config.leader
    instance = _int_env(env, "ASCEND_SERVE_INSTANCE") if "ASCEND_SERVE_INSTANCE" in env else 0
    if leader.workload == "LeaderWorkerSet":
        if "LWS_WORKER_INDEX" not in env:
            if topo.pods_per_instance > 1:
                raise LaunchError(
                    "LWS_WORKER_INDEX is not set: this pod is not part of a LeaderWorkerSet group"
                )
            return instance, 0, None
        index = _int_env(env, "LWS_WORKER_INDEX")
        size = env.get("LWS_GROUP_SIZE")
        if size is not None and size.isdigit() and int(size) != topo.pods_per_instance:
            raise LaunchError(
                f"LWS_GROUP_SIZE={size} but the plan has "
                f"{topo.pods_per_instance} pods per instance: the "
                "LeaderWorkerSet and its ConfigMap disagree; re-apply both"
            )
        leader_name = env.get("LWS_LEADER_ADDRESS")
        if index > 0 and not leader_name:
            raise LaunchError("LWS_LEADER_ADDRESS is not set on a worker pod")
    else:
        pod = env.get("POD_NAME") or env.get("HOSTNAME") or socket.gethostname()
        match = re.fullmatch(r"(.+)-(\d+)", pod)
        if not match:
            raise LaunchError(f"pod name {pod!r} has no StatefulSet ordinal suffix")
        statefulset, index = match.group(1), int(match.group(2))
        leader_name = f"{statefulset}-0.{leader.headless_service}.{leader.namespace}.svc"
    if index >= topo.pods_per_instance:
        raise LaunchError(
            f"worker index {index} is outside the instance's {topo.pods_per_instance} pods"
        )
    return instance, index, (leader_name if index > 0 else None)


def wait_for_leader(
    name: str,
    budget_seconds: float,
    resolve: Resolver = socket.gethostbyname,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Resolve the leader's DNS name, retrying with backoff until the budget is spent."""
    deadline = clock() + budget_seconds
    delay, attempts, last = 0.5, 0, ""
    while True:
        attempts += 1
        try:
            return resolve(name)
        except OSError as exc:
            last = str(exc) or exc.__class__.__name__
        remaining = deadline - clock()
        if remaining <= 0:
            raise LaunchError(
                f"the leader {name} did not resolve within {budget_seconds:g} s "
                f"({attempts} attempts; last error: {last}). Check that the leader pod exists "
                "and that its headless Service publishes not-ready addresses; raise "
                "spec.workload.leaderWaitSeconds if leaders start slowly."
            )
        sleep(min(delay, remaining))
        delay = min(delay * 2, 5.0)


def resolve_identity(
    config: RuntimeConfig,
    env: Mapping[str, str],
    resolve: Resolver = socket.gethostbyname,
    sleep: Callable[[float], None] = time.sleep,
) -> PodIdentity:
    instance, index, leader_name = worker_position(config, env)
    pod_ip = _pod_ip(env)
    leader_ip = (
        pod_ip
        if leader_name is None
        else wait_for_leader(leader_name, config.leader.wait_seconds, resolve, sleep)
    )
    return PodIdentity(
        instance=instance, worker_index=index, pod_ip=pod_ip, leader_address=leader_ip
    )


def load_config(path: str) -> RuntimeConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            return RuntimeConfig.model_validate_json(fh.read())
    except OSError as exc:
        raise LaunchError(f"cannot read runtime config {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise LaunchError(f"runtime config {path} is invalid: {exc}") from exc


def print_command(cmd: EngineCommand, ident: PodIdentity, out: TextIO) -> None:
    out.write(
        f"# instance {ident.instance}, worker {ident.worker_index}, pod IP "
        f"{ident.pod_ip}, leader {ident.leader_address}\n"
    )
    for key, value in sorted(cmd.env.items()):
        out.write(f"{key}={value}\n")
    out.write(" ".join(cmd.argv) + "\n")


def launch(
    config_path: str,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Resolve, build, then exec (or print with dry_run)."""
    env = dict(os.environ if env is None else env)
    config = load_config(config_path)
    ident = resolve_identity(config, env)
    cmd = engine_command(config, ident, config_path)
    if dry_run:
        print_command(cmd, ident, out or sys.stdout)
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd.argv[0], cmd.argv, {**env, **cmd.env})
    return 127  # pragma: no cover - exec does not return


def probe(config_path: str, env: Mapping[str, str] | None = None, timeout: float = 3.0) -> int:
    """Readiness/liveness of one pod: the leader's engine answers /health; workers have no
    HTTP server, so a live container is a live worker."""
    env = dict(os.environ if env is None else env)
    config = load_config(config_path)
    _, index, _ = worker_position(config, env)
    if index > 0:
        return 0
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{config.http_port}/health", timeout=timeout
        ) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1
