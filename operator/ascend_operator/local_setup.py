"""What `ascend-serve up` sets up before it starts a process: loopback ports (several
instances share one network here, where pods would each have their own), the model directory
on this machine, the vLLM environment it finds, and each instance's own configuration where a
pod's would not fit (KV ports of vLLM ranks, KV-event ports of sim instances)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from ascend_runtime.config import KvEventsEndpoint, KvEventsSettings, RuntimeConfig

from .planner.names import MODEL_MOUNT
from .planner.results import Plan

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_port_block(count: int, taken: set[int]) -> int:
    """First port of `count` consecutive free ports, none of them in `taken` (which grows)."""
    for _ in range(200):
        base = free_port()
        ports = range(base, base + count)
        if base + count <= 65536 and not taken.intersection(ports) and all(map(port_free, ports)):
            taken.update(ports)
            return base
    raise RuntimeError(f"found no {count} consecutive free ports on {LOOPBACK}")


class UpError(ValueError):
    """The spec cannot run on this machine as asked; the message says what to change."""


def local_model_path(plan: Plan) -> str:
    """Where the engine finds the weights on this machine."""
    source = plan.spec.model.source
    if source.host_path is not None:
        path = Path(source.host_path.path)
        if not path.is_dir():
            raise UpError(
                f"spec.model.source.hostPath.path {path} is not a directory on this machine: "
                "point it at the local model directory"
            )
        return str(path)
    if source.hugging_face is not None:
        return source.hugging_face.id  # vLLM resolves it from the local Hugging Face cache
    raise UpError(
        "spec.model.source.pvc has no path on this machine: for `up --engine vllm` use "
        "spec.model.source.hostPath with the local model directory"
    )


def vllm_executable() -> str:
    """The `vllm` command on PATH, or an error saying how to get one."""
    exe = shutil.which("vllm")
    if exe is None:
        raise UpError(
            "--engine vllm needs the `vllm` command on PATH: on an Ascend host install "
            "vllm-ascend; elsewhere `make vllm-venv` builds vLLM's CPU build in .venv-vllm "
            "(then PATH=$PWD/.venv/bin:$PWD/.venv-vllm/bin:$PATH)"
        )
    return exe


def engine_has_mooncake(vllm: str) -> bool:
    """Whether the Python that runs `vllm` can import Mooncake's transfer engine."""
    with open(vllm, "rb") as f:
        first = f.readline().decode(errors="replace")
    python = first[2:].strip().split()[0] if first.startswith("#!") else sys.executable
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mooncake') is None)"
    try:
        return subprocess.run([python, "-c", probe], timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def local_vllm_config(
    config: RuntimeConfig, model_path: str, kv_port: int | None, transport: str
) -> RuntimeConfig:
    update: dict[str, object] = {
        "model_path": model_path,
        "engine_args": local_draft(config.engine_args, model_path),
    }
    if config.kv_transfer is not None and kv_port is not None:
        extra = dict(config.kv_transfer.extra_config)
        if config.kv_transfer.module_path:  # ascend-serve's connector takes a transport
            extra["transport"] = transport
        update["kv_transfer"] = config.kv_transfer.model_copy(
            update={"kv_port": kv_port, "extra_config": extra}
        )
    return config.model_copy(update=update)


def check_kv_aware(plan: Plan, engine: str) -> None:
    """Precise mode hashes as the spec's engine does: it cannot follow another one."""
    kv = plan.router.config.kv_aware
    if kv is not None and kv.mode == "precise" and (kv.hashing == "vllm") != (engine == "vllm"):
        raise UpError(
            f"spec.router.kvAware.mode: precise was planned for engine "
            f"{plan.spec.runtime.engine}, whose block hashes differ from {engine}'s: set "
            f"spec.runtime.engine: {engine}, or kvAware.mode: approximate, to run --engine "
            f"{engine}"
        )


def local_vllm_events(
    config: RuntimeConfig, taken: set[int]
) -> tuple[RuntimeConfig, KvEventsEndpoint | None]:
    """One vLLM instance's config with its own KV-event ports (its ranks' events on base + r,
    their replay sockets on base + ranks + r), and where the router subscribes; None when
    the instance publishes no events."""
    args = list(config.engine_args)
    if "--kv-events-config" not in args:
        return config, None
    ranks = config.topology.data_local
    base = free_port_block(2 * ranks, taken)
    at = args.index("--kv-events-config") + 1
    events = json.loads(args[at])
    # vLLM binds only wildcard endpoints (a host makes its PUB socket connect)
    events |= {"endpoint": f"tcp://*:{base}", "replay_endpoint": f"tcp://*:{base + ranks}"}
    args[at] = json.dumps(events, separators=(",", ":"))
    where = KvEventsEndpoint(
        endpoint=f"tcp://{LOOPBACK}:{base}", replay_endpoint=f"tcp://{LOOPBACK}:{base + ranks}"
    )
    return config.model_copy(update={"engine_args": args}), where


def local_kv_events(config: RuntimeConfig, path: Path, taken: set[int]) -> KvEventsEndpoint:
    """Write one sim instance's config with its own KV-event ports; where the router
    subscribes."""
    base = free_port_block(2, taken)
    publish, replay = f"tcp://{LOOPBACK}:{base}", f"tcp://{LOOPBACK}:{base + 1}"
    sim = config.sim.model_copy(
        update={"kv_events": KvEventsSettings(endpoint=publish, replay_endpoint=replay)}
    )
    path.write_text(config.model_copy(update={"sim": sim}).model_dump_json(indent=2))
    return KvEventsEndpoint(endpoint=publish, replay_endpoint=replay)


def local_draft(args: list[str], model_path: str, draft_path: str | None = None) -> list[str]:
    """Engine args with an Eagle3 draft under the pod's model mount moved to this machine's
    model directory (the hostPath the pod would mount there), or to `draft_path`."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg != "--speculative-config":
            continue
        config = json.loads(out[i + 1])
        draft = config.get("model")
        if isinstance(draft, str) and draft.startswith(f"{MODEL_MOUNT}/"):
            local = Path(model_path) / draft[len(MODEL_MOUNT) + 1 :]
            config["model"] = draft_path or str(local)
            out[i + 1] = json.dumps(config, separators=(",", ":"))
    return out
