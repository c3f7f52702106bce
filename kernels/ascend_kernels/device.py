"""Device facts the kernels size themselves from: core count, grid caps, on-chip tile budgets.

Ascend NPUs have tens of vector cores and a small unified buffer per core; NVIDIA GPUs have
about a hundred SMs with large register files. Kernels launch a persistent grid of about two
programs per core and loop over their work items inside, so neither side launches thousands of
programs, and no kernel hard-codes a core count.
"""

from __future__ import annotations

import functools

import torch

PROGRAMS_PER_CORE = 2
"""Programs per Ascend vector core: vllm-ascend found about 2x the core count best on NPU
(a vector core runs one program at a time)."""

GPU_PROGRAMS_PER_SM = 16
"""Programs per NVIDIA SM: an SM keeps many programs' warps in flight, which hides memory
latency; two per SM leaves most of it idle."""

NPU_TILE_BUDGET_BYTES = 32 * 1024
"""Bytes one tile of fp32 work may take on an Ascend vector core (its unified buffer is shared
with double buffering and the kernel's other tiles)."""

GPU_TILE_BUDGET_BYTES = 32 * 1024
"""A tile budget that keeps register pressure reasonable on NVIDIA SMs."""

CPU_CORES_FOR_INTERPRETER = 4
"""Grid cap under TRITON_INTERPRET=1: small, so CPU tests exercise the in-kernel loops."""


@functools.cache
def core_count(device: torch.device | str) -> int:
    """Compute cores of `device`: NPU vector cores, GPU SMs, or a small CPU figure."""
    if device_type(device) == "npu":
        import triton  # triton-ascend reports its cores through the driver's properties

        device = torch.device(device)  # torch_npu is loaded wherever an NPU tensor exists
        index = device.index if device.index is not None else torch.npu.current_device()  # type: ignore[attr-defined]
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        return int(props.get("num_vectorcore") or props["num_aicore"])
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).multi_processor_count
    return CPU_CORES_FOR_INTERPRETER


def programs_per_core(device: torch.device | str) -> int:
    """How many programs per core the persistent grids launch on `device`."""
    return GPU_PROGRAMS_PER_SM if device_type(device) == "cuda" else PROGRAMS_PER_CORE


def grid_size(device: torch.device | str, work_items: int) -> int:
    """Programs to launch for `work_items` independent items: capped at programs_per_core x
    cores (the programs loop over the rest), at least 1."""
    return max(1, min(work_items, programs_per_core(device) * core_count(device)))


def device_type(device: torch.device | str) -> str:
    """ "npu", "cuda" or "cpu" (without needing torch_npu to parse "npu:0")."""
    return device.type if isinstance(device, torch.device) else device.split(":")[0]


def tile_budget_bytes(device: torch.device | str) -> int:
    """Bytes of fp32 working set one tile may use on `device`."""
    return NPU_TILE_BUDGET_BYTES if device_type(device) == "npu" else GPU_TILE_BUDGET_BYTES


def pow2_floor(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (max(1, n).bit_length() - 1)


def pow2_ceil(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(1, n) - 1).bit_length()


def channel_tile(dim: int, device: torch.device | str = "npu") -> int:
    """Channel tile of the conv kernels: on NPU 512, or 256 when the dimension is below 512
    (vllm-ascend's sizing); on GPUs 256, which measured faster on an H100."""
    if device_type(device) == "cuda":
        return 256
    return 512 if dim >= 512 else 256
