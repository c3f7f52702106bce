"""What a connector instance needs to know, as plain values (the vLLM adapter fills it in).

Read from `kv_connector_extra_config`, with the instance's parallelism and model facts taken
from vLLM's config. Every bad value raises `ValueError` naming the key and the fix.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..layout import LAYOUTS, heads_major
from ..rank_map import KvPlacement

Role = Literal["prefill", "decode", "both"]
ROLES: dict[str, Role] = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "both"}
TRANSPORTS = ("tcp", "mooncake")


@dataclass(frozen=True)
class ConnectorSettings:
    """One instance's side of the prefill->decode hand-off."""

    role: Role
    engine_id: str
    host: str
    """This node's IP as decode instances reach it (VLLM_HOST_IP)."""
    kv_port: int
    """Base port; rank r of data-parallel rank d serves on kv_port + d*TP*PCP + r."""
    tp: int
    kv_heads: int
    block_size: int
    num_blocks: int
    pcp: int = 1
    dcp: int = 1
    interleave: int = 1
    mla: bool = False
    dp_rank: int = 0
    layout: str = "cross_layer"
    """Layout of the host staging buffer that transfers read from and write to."""
    transport: str = "tcp"
    timeout: float = 120.0
    """Seconds a prefill instance holds a request's KV for its decode side."""
    checksum: bool = False
    rank_hosts: Mapping[int, str] = field(default_factory=dict)
    """Prefill rank -> IP, for instances whose ranks span nodes (else all ranks use `host`)."""

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "both"):
            raise ValueError(
                f"kv_role must be kv_producer, kv_consumer or kv_both, got {self.role!r}"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"kv_connector_extra_config.kv_layout {self.layout!r} is not one of "
                f"{', '.join(LAYOUTS)}"
            )
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"kv_connector_extra_config.transport {self.transport!r} is not one of "
                f"{', '.join(TRANSPORTS)}"
            )
        if not 0 < self.kv_port < 65536 or self.side_port + self.tp * self.pcp > 65536:
            raise ValueError(
                f"kv_port {self.kv_port} leaves no room for {self.tp * self.pcp} rank ports of "
                f"data-parallel rank {self.dp_rank}: choose a kv_port below "
                f"{65536 - (self.dp_rank + 1) * self.tp * self.pcp}"
            )
        if self.timeout <= 0:
            raise ValueError(
                f"kv_connector_extra_config.timeout must be > 0 seconds, got {self.timeout}"
            )
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        self.placement()  # validates TP/heads/PCP/DCP together

    @property
    def side_port(self) -> int:
        """Port of this data-parallel rank's first rank (vllm-ascend's side-channel port)."""
        return self.kv_port + self.dp_rank * self.tp * self.pcp

    def rank_port(self, rank: int) -> int:
        return self.side_port + rank

    @property
    def produces(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def consumes(self) -> bool:
        return self.role in ("decode", "both")

    def placement(self) -> KvPlacement:
        return KvPlacement(
            tp=self.tp,
            kv_heads=self.kv_heads,
            block_size=self.block_size,
            pcp=self.pcp,
            dcp=self.dcp,
            interleave=self.interleave,
            mla=self.mla,
            role=f"{self.role} instance {self.engine_id}",
        )


def from_extra_config(extra: Mapping[str, Any] | None, **known: Any) -> ConnectorSettings:
    """Settings from `kv_connector_extra_config` plus what the engine config already says
    (`known`: role, engine_id, host, kv_port, tp, pcp, dcp, interleave, kv_heads, mla,
    block_size, num_blocks, dp_rank)."""
    extra = dict(extra or {})
    role = known.pop("role")
    if role in ROLES:
        role = ROLES[role]
    values: dict[str, Any] = {"role": role, **known}
    casts = {"kv_layout": ("layout", str), "transport": ("transport", str),
             "timeout": ("timeout", float), "checksum": ("checksum", _boolean)}  # fmt: skip
    for key, (name, cast) in casts.items():
        if key in extra:
            try:
                values[name] = cast(extra[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"kv_connector_extra_config.{key}: {exc}") from exc
    hosts = extra.get("rank_hosts")
    if hosts is not None:
        values["rank_hosts"] = _rank_hosts(hosts)
    unknown = sorted(set(extra) - {*casts, "rank_hosts", "prefill", "decode", "use_ascend_direct"})
    if unknown:
        raise ValueError(
            f"kv_connector_extra_config has unknown keys {unknown}: ascend-serve's connector "
            f"reads {sorted({*casts, 'rank_hosts'})}"
        )
    return ConnectorSettings(**values)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _rank_hosts(hosts: Any) -> dict[int, str]:
    if isinstance(hosts, list):
        return {i: str(h) for i, h in enumerate(hosts)}
    if isinstance(hosts, Mapping):
        try:
            return {int(k): str(v) for k, v in hosts.items()}
        except ValueError as exc:
            raise ValueError(
                f"kv_connector_extra_config.rank_hosts keys must be rank numbers: {exc}"
            ) from exc
    raise ValueError(
        "kv_connector_extra_config.rank_hosts must be a list of IPs (one per rank) or a "
        f"rank -> IP mapping, got {type(hosts).__name__}"
    )


def host_ip(env: Mapping[str, str]) -> str:
    """The IP decode instances reach this node at: VLLM_HOST_IP (the pod IP in our pods)."""
    ip = env.get("VLLM_HOST_IP") or env.get("POD_IP")
    if ip:
        return ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def from_vllm_config(
    vllm_config: Any, num_blocks: int, env: Mapping[str, str] | None = None
) -> ConnectorSettings:
    """Settings from a vLLM `VllmConfig` (read by attribute; vLLM is not imported here)."""
    env = os.environ if env is None else env
    ktc = vllm_config.kv_transfer_config
    par = vllm_config.parallel_config
    model = vllm_config.model_config
    if ktc.kv_port is None:
        raise ValueError("kv_transfer_config.kv_port is required (the first rank's port)")
    extra = dict(ktc.kv_connector_extra_config or {})
    page_layout = engine_page_layout(vllm_config)
    if page_layout is not None:
        extra["kv_layout"] = staging_layout(str(extra.get("kv_layout", "cross_layer")), page_layout)
    return from_extra_config(
        extra,
        role=ktc.kv_role,
        engine_id=str(ktc.engine_id),
        host=host_ip(env),
        kv_port=int(ktc.kv_port),
        tp=int(par.tensor_parallel_size),
        pcp=int(getattr(par, "prefill_context_parallel_size", 1) or 1),
        dcp=int(getattr(par, "decode_context_parallel_size", 1) or 1),
        interleave=int(getattr(par, "cp_kv_cache_interleave_size", 1) or 1),
        dp_rank=int(getattr(par, "data_parallel_rank", 0) or 0),
        kv_heads=1 if getattr(model, "use_mla", False) else int(model.get_total_num_kv_heads()),
        mla=bool(getattr(model, "use_mla", False)),
        block_size=int(vllm_config.cache_config.block_size),
        num_blocks=int(num_blocks),
    )


def engine_page_layout(vllm_config: Any) -> str | None:
    """The KVCacheLayout vLLM resolved (0.3x: "LBHNC", ...), or None for older lines."""
    layout = getattr(vllm_config.cache_config, "kv_cache_layout", None)
    return None if layout is None else str(getattr(layout, "name", layout))


def staging_layout(configured: str, page_layout: str) -> str:
    """The staging layout that copies blocks byte for byte from the engine's pages: the
    configured cross-layer or per-layer choice, with the engine's order inside a block."""
    base = configured.removesuffix("_hnd")
    if base not in LAYOUTS:
        raise ValueError(
            f"kv_connector_extra_config.kv_layout {configured!r} is not one of {', '.join(LAYOUTS)}"
        )
    return base + "_hnd" if heads_major(page_layout) else base


def offload_host_blocks(
    extra: Mapping[str, Any] | None, block_bytes: int, world_size: int = 1
) -> int:
    """Host blocks per rank for KV offload: `num_cpu_blocks`, `cpu_bytes_per_rank`, or
    `cpu_bytes_to_use` (the whole instance's budget) split over its ranks; `block_bytes` is one
    rank's block over all layers."""
    extra = extra or {}
    if "cpu_bytes_per_rank" in extra:
        blocks = int(extra["cpu_bytes_per_rank"]) // block_bytes
        source = f"cpu_bytes_per_rank={extra['cpu_bytes_per_rank']} ({block_bytes} per block)"
    elif "num_cpu_blocks" in extra:
        blocks = int(extra["num_cpu_blocks"])
        source = f"num_cpu_blocks={extra['num_cpu_blocks']}"
    elif "cpu_bytes_to_use" in extra:
        per_rank = int(extra["cpu_bytes_to_use"]) // max(1, world_size)
        blocks = per_rank // block_bytes
        source = (
            f"cpu_bytes_to_use={extra['cpu_bytes_to_use']} over {world_size} ranks "
            f"({per_rank} bytes each, {block_bytes} per block)"
        )
    else:
        raise ValueError(
            "kv_connector_extra_config needs cpu_bytes_per_rank, cpu_bytes_to_use (host bytes "
            "for the whole instance) or num_cpu_blocks for KV offload"
        )
    if blocks < 1:
        raise ValueError(f"KV offload gets no host block from {source}: raise cpu_bytes_to_use")
    return blocks
