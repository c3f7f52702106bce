"""Ascend node profiles (Atlas 800 A2 / A3) and the virtual profile of NPU-less sim runs."""

from __future__ import annotations

from dataclasses import dataclass

from ..api.spec import HardwareSpec


@dataclass(frozen=True)
class HardwareProfile:
    """One node type, per NPU device as the device plugin advertises it."""

    name: str
    resource_name: str | None
    """Extended resource requested per device; None: request nothing (sim without NPUs)."""
    devices_per_node: int
    memory_per_device_gib: int
    peak_tflops_bf16: float
    """Dense BF16 peak per device (approximate public figure; feeds the sim latency model)."""
    hbm_gbps: float
    """HBM bandwidth per device in GB/s (approximate public figure; sim latency model)."""


PROFILES: dict[str, HardwareProfile] = {
    # Atlas 800T A2: 8 x Ascend 910B, 32 or 64 GB each.
    "A2": HardwareProfile("A2", "huawei.com/Ascend910", 8, 64, 313.0, 1600.0),
    # Atlas 800 A3: 16 dies (8 x Ascend 910C), 64 GB each; the device plugin exposes dies.
    "A3": HardwareProfile("A3", "huawei.com/ascend-1980", 16, 64, 376.0, 1600.0),
}

NO_NPU = HardwareProfile("none", None, 16, 64, 376.0, 1600.0)
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
    )
