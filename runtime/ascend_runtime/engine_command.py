"""The engine command of one pod: RuntimeConfig + PodIdentity -> argv and environment.

Pure: the launcher calls it with the identity it resolved; the operator calls it with
placeholders to show users exactly what each pod will run (`ascend-serve plan`, the rendered
ConfigMap).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from .config import PodIdentity, RuntimeConfig


@dataclass(frozen=True)
class EngineCommand:
    """What a pod executes."""

    argv: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        """The command as one shell line, environment first (for humans, not for exec)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}".strip()


@dataclass(frozen=True)
class Listen:
    """Where an engine listens when it is not in a pod (`ascend-serve up`): the address and
    HTTP port, and a sim prefill instance's KV side-channel port."""

    host: str
    port: int
    kv_port: int | None = None


def engine_id(config: RuntimeConfig, instance: int) -> str:
    """Mooncake engine id of one instance: unique per deployment, role and instance."""
    assert config.kv_transfer is not None
    return f"{config.kv_transfer.engine_id_prefix}-{instance}"


def kv_transfer_json(config: RuntimeConfig, instance: int) -> str:
    """The `--kv-transfer-config` JSON of one instance."""
    kv = config.kv_transfer
    assert kv is not None
    payload = {
        "kv_connector": kv.connector,
        **({"kv_connector_module_path": kv.module_path} if kv.module_path else {}),
        "kv_role": kv.kv_role,
        "kv_port": kv.kv_port,
        "engine_id": engine_id(config, instance),
        "kv_connector_extra_config": kv.extra_config,
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=False)


def data_parallel_args(config: RuntimeConfig, ident: PodIdentity) -> list[str]:
    """Data-parallel flags: size, local size; across pods also address, RPC port, and on
    non-leader pods `--headless --data-parallel-start-rank i*L`."""
    topo = config.topology
    if topo.data == 1:
        return []
    args = [
        "--data-parallel-size",
        str(topo.data),
        "--data-parallel-size-local",
        str(topo.data_local),
    ]
    if topo.pods_per_instance > 1:
        args += [
            "--data-parallel-address",
            ident.leader_address,
            "--data-parallel-rpc-port",
            str(topo.data_parallel_rpc_port),
        ]
        if ident.worker_index > 0:
            args += [
                "--headless",
                "--data-parallel-start-rank",
                str(ident.worker_index * topo.data_local),
            ]
    return args


def vllm_command(
    config: RuntimeConfig, ident: PodIdentity, listen: Listen | None = None, vllm: str = "vllm"
) -> EngineCommand:
    """`vllm serve` for one pod of the role."""
    argv = [vllm, "serve", config.model_path, *config.engine_args]
    argv += data_parallel_args(config, ident)
    if config.kv_transfer is not None:
        argv += ["--kv-transfer-config", kv_transfer_json(config, ident.instance)]
    if listen is not None:  # instead of the pod's 0.0.0.0:8000 (vLLM warns on repeated flags)
        argv = [*_without(argv, ("--host", "--port")), "--host", listen.host]
        argv += ["--port", str(listen.port)]
    env = dict(config.env)
    env.setdefault("HCCL_IF_IP", ident.pod_ip)
    env.setdefault("VLLM_HOST_IP", ident.pod_ip)
    return EngineCommand(argv=argv, env=env)


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv without the given `--option value` pairs."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            out.append(arg)
    return out


def sim_command(
    config: RuntimeConfig,
    ident: PodIdentity,
    config_path: str,
    listen: Listen | None = None,
    program: tuple[str, ...] = ("ascend-serve",),
) -> EngineCommand:
    """The NPU-mocked engine for one pod (only leaders serve; workers idle like headless
    vLLM workers)."""
    argv = [
        *program,
        "sim",
        "--config",
        config_path,
        "--instance",
        str(ident.instance),
        "--worker-index",
        str(ident.worker_index),
    ]
    if listen is not None:
        argv += ["--host", listen.host, "--port", str(listen.port)]
        if listen.kv_port is not None:
            argv += ["--kv-port", str(listen.kv_port)]
    env = dict(config.env)
    env.setdefault("VLLM_HOST_IP", ident.pod_ip)
    return EngineCommand(argv=argv, env=env)


def engine_command(
    config: RuntimeConfig,
    ident: PodIdentity,
    config_path: str = "/etc/ascend-serve/runtime.json",
    *,
    listen: Listen | None = None,
    program: tuple[str, ...] = ("ascend-serve",),
    vllm: str = "vllm",
) -> EngineCommand:
    """The command a pod runs, for either engine; `up` passes where each process listens
    and the executables of this machine (`program`: ascend-serve's own command)."""
    if config.engine == "vllm":
        return vllm_command(config, ident, listen, vllm)
    return sim_command(config, ident, config_path, listen, program)


def router_command(
    config_path: str,
    listen: Listen | None = None,
    health_interval: float | None = None,
    program: tuple[str, ...] = ("ascend-serve",),
) -> list[str]:
    """The router's command line (its pods and `up`)."""
    argv = [*program, "router", "--config", config_path]
    if listen is not None:
        argv += ["--host", listen.host, "--port", str(listen.port)]
    if health_interval is not None:
        argv += ["--health-interval", f"{health_interval:g}"]
    return argv
