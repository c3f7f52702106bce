"""Ascend node profiles (Atlas 800 A2 / A3) and the virtual profile of NPU-less sim runs.

Every figure feeding the sim's latency model names its source; none is fitted to the
throughput figures `ascend-serve simulate` is compared with (docs/sim.md).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..api.spec import HardwareSpec

INT8_PER_BF16 = 2.0
"""INT8 peak over BF16 peak of the Da Vinci cube unit: Ascend 910 launched at 256 TFLOPS FP16
and 512 TOPS INT8 (Huawei, 2019)."""

DEEPEP_A3_NORMAL_GBPS = {8: (146, 125), 16: (107, 103), 32: (102, 95), 64: (81, 91), 128: (57, 81)}
"""EP size -> (dispatch, combine) bottleneck GB/s of DeepEP-Ascend's normal kernels on an A3
SuperPOD, 4096 tokens, INT8 dispatch / BF16 combine (sgl-project/sgl-kernel-npu README)."""
DEEPEP_A3_LOW_LATENCY_US = {8: (132, 126), 16: (139, 135), 32: (153, 151)}
"""EP size -> (dispatch, combine) microseconds of DeepEP-Ascend's low-latency kernels at 128
tokens per rank, A3 SuperPOD (same README). Used as the floor of every MoE layer's exchange:
at decode sizes the time is synchronisation, not bytes."""
DEEPEP_A2_GBPS = {8: (102, 152), 16: (87, 121)}
"""EP size -> (dispatch, combine) bottleneck GB/s intranode (EP 8) and internode (EP 16)
(sgl-kernel-npu's earlier README, shared/FACTS.md)."""
INTERNODE_GBPS = 87.0
"""Per-device bandwidth between nodes: DeepEP-Ascend's internode dispatch at EP 16 (as above);
the PD KV transfer's link."""


@dataclass(frozen=True)
class HardwareProfile:
    """One node type, per NPU device as the device plugin advertises it."""

    name: str
    resource_name: str | None
    """Extended resource requested per device; None: request nothing (sim without NPUs)."""
    devices_per_node: int
    memory_per_device_gib: int
    peak_tflops_bf16: float
    """Dense BF16 peak per device."""
    hbm_gbps: float
    """HBM bandwidth per device in GB/s."""
    moe_gbps: dict[int, tuple[int, int]] = field(default_factory=dict, compare=False)
    """EP size -> (dispatch, combine) GB/s, published measurements."""

    def moe_bandwidth(self, ep: int) -> tuple[float, float]:
        """(dispatch, combine) bytes/s at this EP size: the published row at or above it."""
        return _row(self.moe_gbps, ep, 1e9)

    def moe_floor_seconds(self, ep: int) -> float:
        """Dispatch + combine of one MoE layer at decode sizes."""
        return sum(_row(DEEPEP_A3_LOW_LATENCY_US, ep, 1e-6))

    @property
    def tp_link_bytes_per_second(self) -> float:
        """Tensor-parallel ranks share a node: the intranode EP 8 dispatch bandwidth stands
        for the HCCS bandwidth one device reaches (no all-reduce figure is published)."""
        return self.moe_bandwidth(8)[0]


def _row(table: dict[int, tuple[int, int]], ep: int, unit: float) -> tuple[float, float]:
    sizes = sorted(table)
    pick = sizes[min(bisect.bisect_left(sizes, ep), len(sizes) - 1)]
    return table[pick][0] * unit, table[pick][1] * unit


PROFILES: dict[str, HardwareProfile] = {
    # Atlas 800T A2: 8 x Ascend 910B, 32 or 64 GB each. About 320 TFLOPS FP16 (public
    # figures); HBM2e at 1.6 TB/s (public figures; no primary source here).
    "A2": HardwareProfile("A2", "huawei.com/Ascend910", 8, 64, 320.0, 1600.0, DEEPEP_A2_GBPS),
    # Atlas 800 A3: 8 x Ascend 910C = 16 dies of 64 GB; the device plugin exposes dies. 910C:
    # 780 TFLOPS BF16 and 3.2 TB/s over its two dies (TechPowerUp / DigiTimes, 2025-04-21).
    "A3": HardwareProfile(
        "A3", "huawei.com/ascend-1980", 16, 64, 390.0, 1600.0, DEEPEP_A3_NORMAL_GBPS
    ),
}

NO_NPU = HardwareProfile("none", None, 16, 64, 390.0, 1600.0, DEEPEP_A3_NORMAL_GBPS)
"""Engine sim without spec.hardware: shaped like an A3 node, but requests no devices."""


def resolve_profile(spec: HardwareSpec | None) -> HardwareProfile:
    """The profile named by the spec with its overrides applied."""
    if spec is None:
        return NO_NPU
    base = PROFILES[spec.profile]
    return HardwareProfile(
        name=base.name,
        resource_name=spec.resource_name or base.resource_name,
        devices_per_node=spec.devices_per_node or base.devices_per_node,
        memory_per_device_gib=spec.memory_per_device_gib or base.memory_per_device_gib,
        peak_tflops_bf16=base.peak_tflops_bf16,
        hbm_gbps=base.hbm_gbps,
        moe_gbps=base.moe_gbps,
    )
