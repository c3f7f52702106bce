"""Fit one role's parallelism onto nodes: devices per pod, pods per instance, ranks per pod."""

from __future__ import annotations

from dataclasses import dataclass

from ..api.spec import Parallelism
from .architectures import Architecture
from .capabilities import RuntimeCapabilities
from .hardware import HardwareProfile
from .problems import Problem


@dataclass(frozen=True)
class PodLayout:
    """One pod of an instance."""

    worker_index: int
    dp_ranks: tuple[int, ...]
    """Global data-parallel ranks this pod runs."""
    devices: int

    @property
    def leader(self) -> bool:
        return self.worker_index == 0


@dataclass(frozen=True)
class RoleLayout:
    """How one instance of a role sits on nodes."""

    data_local: int
    pods_per_instance: int
    devices_per_pod: int
    ranks_devices: int
    pods: tuple[PodLayout, ...]


def _default_data_local(data: int, ranks_devices: int, devices_per_node: int) -> int:
    """Largest divisor of `data` whose ranks fit one node (at least 1)."""
    fit = max(1, devices_per_node // ranks_devices)
    return max(d for d in range(1, data + 1) if data % d == 0 and d <= fit)


def layout_role(
    path: str, par: Parallelism, hw: HardwareProfile, problems: list[Problem]
) -> RoleLayout | None:
    """Pods and devices of one instance; appends problems and returns None when it cannot fit."""
    ranks_devices = par.tensor * par.pipeline * par.prefill_context
    ok = True
    if ranks_devices > hw.devices_per_node:
        problems.append(
            Problem(
                f"{path}.parallelism",
                f"tensor x pipeline x prefillContext = {par.tensor} x {par.pipeline} x "
                f"{par.prefill_context} = {ranks_devices} devices per engine rank, but a node "
                f"({hw.name}) has {hw.devices_per_node}",
                "an engine rank cannot span nodes: lower tensor/pipeline/prefillContext so "
                f"their product is at most {hw.devices_per_node}, and spread over nodes with "
                "data parallelism (data, dataLocal)",
            )
        )
        ok = False
    if par.data_local is not None and par.data % par.data_local != 0:
        problems.append(
            Problem(
                f"{path}.parallelism.dataLocal",
                f"dataLocal {par.data_local} does not divide data {par.data}",
                "choose dataLocal so that data / dataLocal (the pods per instance) is whole, "
                f"e.g. one of {[d for d in range(1, par.data + 1) if par.data % d == 0]}",
            )
        )
        ok = False
    if not ok:
        return None
    data_local = par.data_local or _default_data_local(par.data, ranks_devices, hw.devices_per_node)
    devices_per_pod = data_local * ranks_devices
    if devices_per_pod > hw.devices_per_node:
        fit = hw.devices_per_node // ranks_devices
        problems.append(
            Problem(
                f"{path}.parallelism.dataLocal",
                f"tensor x pipeline x prefillContext x dataLocal = {ranks_devices} x {data_local} "
                f"= {devices_per_pod} devices per pod, but a node ({hw.name}) has "
                f"{hw.devices_per_node}",
                f"lower dataLocal to at most {fit} (a divisor of data {par.data}); instances then "
                "span more pods, one per node",
            )
        )
        return None
    pods_per_instance = par.data // data_local
    pods = tuple(
        PodLayout(
            worker_index=i,
            dp_ranks=tuple(range(i * data_local, (i + 1) * data_local)),
            devices=devices_per_pod,
        )
        for i in range(pods_per_instance)
    )
    return RoleLayout(data_local, pods_per_instance, devices_per_pod, ranks_devices, pods)


def check_context_parallel(
    path: str,
    par: Parallelism,
    arch: Architecture,
    caps: RuntimeCapabilities,
    problems: list[Problem],
) -> None:
    """PCP/DCP rules: runtime support, PCP x PP, DCP vs TP and KV heads."""
    pcp, dcp, tp = par.prefill_context, par.decode_context, par.tensor
    if pcp > 1 and not caps.prefill_context_parallel:
        problems.append(
            Problem(
                f"{path}.parallelism.prefillContext",
                f"prefill context parallelism ({pcp}) is not supported by vllm-ascend "
                f"{caps.line} (dropped in 2026-07, #12728)",
                "set prefillContext: 1, or run spec.runtime.version v0.13.x or v0.18.x",
            )
        )
    if pcp > 1 and par.pipeline > 1:
        problems.append(
            Problem(
                f"{path}.parallelism",
                f"prefillContext {pcp} and pipeline {par.pipeline} are both above 1",
                "use prefill context parallelism or pipeline parallelism, not both",
            )
        )
    if dcp > 1 and not caps.decode_context_parallel:
        problems.append(
            Problem(
                f"{path}.parallelism.decodeContext",
                f"decode context parallelism is not supported by vllm-ascend {caps.line}",
                "set decodeContext: 1, or run spec.runtime.version v0.13.x or later",
            )
        )
    if dcp > 1 and tp % dcp != 0:
        problems.append(
            Problem(
                f"{path}.parallelism.decodeContext",
                f"decodeContext {dcp} does not divide tensor {tp} (DCP reuses the TP ranks)",
                f"choose decodeContext among {[d for d in range(1, tp + 1) if tp % d == 0]}",
            )
        )
    elif dcp > 1 and arch.mla is False and arch.num_kv_heads:
        heads = arch.num_kv_heads
        replicas = tp // heads if tp % heads == 0 else 0
        if replicas < dcp or replicas % dcp != 0:
            problems.append(
                Problem(
                    f"{path}.parallelism.decodeContext",
                    f"with {heads} KV heads and tensor {tp}, each KV head is held by "
                    f"{replicas or 'a fraction of'} rank(s); GQA needs tensor / kvHeads >= "
                    f"decodeContext and divisible by it",
                    f"lower decodeContext to a divisor of {max(replicas, 1)}, or raise tensor",
                )
            )
