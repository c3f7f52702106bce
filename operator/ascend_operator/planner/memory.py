"""Memory per device of a role: weights by quantization, a reserve for activations and graphs,
the HCCL buffer, and the KV cache one full-length sequence needs (vLLM refuses to start
without it).

An estimate from the architecture's parameter counts, not a measurement: embeddings and norms
are counted at the weights' width, and the reserve is our assumption (vLLM profiles the real
activation peak at start). Nothing here was checked on an NPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api.spec import ModelDeploymentSpec, RoleSpec
from .architectures import Architecture
from .hardware import HardwareProfile

GIB = 1024**3
BYTES_PER_PARAM = {"none": 2.0, "w8a8": 1.0, "w8a8-dynamic": 1.0, "w4a8": 0.5}
"""Bytes per weight: 16-bit unquantized (bfloat16 / float16), 8-bit and 4-bit msModelSlim."""
DTYPE_BYTES = {"auto": 2.0, "bfloat16": 2.0, "float16": 2.0, "float32": 4.0}
RESERVE_GIB = 4.0
"""Activations, sampler and captured graphs per device: our assumption, not a measurement."""
NEAR_FRACTION = 0.1
"""Warn when less than this share of the budget is left after the minimum."""


@dataclass(frozen=True)
class MemoryBudget:
    """GiB per device of one role's engine."""

    budget: float
    """memory per device x gpuMemoryUtilization."""
    weights: float
    reserve: float
    hccl: float
    kv_one_sequence: float
    """KV cache for one maxModelLen-token sequence on this device."""
    kv_per_token_bytes: float

    @property
    def kv_available(self) -> float:
        return self.budget - self.weights - self.reserve - self.hccl

    @property
    def sequences_at_full_length(self) -> float:
        return self.kv_available / self.kv_one_sequence if self.kv_one_sequence else 0.0

    def summary(self) -> str:
        return (
            f"memory per device: {self.budget:.1f} GiB budget = weights {self.weights:.1f} + "
            f"reserve {self.reserve:.1f} + HCCL {self.hccl:.1f} + KV {self.kv_available:.1f} "
            f"({self.sequences_at_full_length:.1f} sequences at full length)"
        )


def split_params(arch: Architecture) -> tuple[float, float] | None:
    """(dense, expert) parameters in billions, from total and active counts and top-k / E:
    active = dense + expert x k / E."""
    if not arch.total_params_b or not arch.active_params_b:
        return None
    if not arch.is_moe or not arch.experts_per_token:
        return arch.total_params_b, 0.0
    share = arch.experts_per_token / arch.num_experts  # type: ignore[operator]
    expert = (arch.total_params_b - arch.active_params_b) / (1 - share)
    return arch.total_params_b - expert, expert


def kv_bytes_per_token(arch: Architecture, tensor: int) -> float | None:
    """KV bytes one token takes on one tensor-parallel rank (16-bit cache): MLA keeps one
    latent row per layer on every rank; GQA splits the KV heads (each replicated when TP is
    larger)."""
    if not arch.num_layers or not arch.head_dim:
        return None
    if arch.mla:
        return arch.num_layers * arch.head_dim * 2.0
    if not arch.num_kv_heads:
        return None
    heads = max(1, arch.num_kv_heads // tensor)
    return arch.num_layers * 2 * heads * arch.head_dim * 2.0


def budget(
    spec: ModelDeploymentSpec,
    role: RoleSpec,
    arch: Architecture,
    hw: HardwareProfile,
    hccl_mb: int | None,
) -> MemoryBudget | None:
    """The role's budget per device, or None where the architecture leaves it unknown."""
    params = split_params(arch)
    per_token = kv_bytes_per_token(arch, role.parallelism.tensor)
    max_len = spec.model.max_model_len
    if params is None or per_token is None or not max_len:
        return None
    par = role.parallelism
    width = (
        DTYPE_BYTES[spec.model.dtype]
        if spec.model.quantization == "none"
        else BYTES_PER_PARAM[spec.model.quantization]
    )
    dense, expert = params
    ranks = par.tensor * par.pipeline
    expert_ranks = par.tensor * par.data * par.pipeline if par.expert else ranks
    weights = (dense / ranks + expert / expert_ranks) * 1e9 * width / GIB
    layers_here = 1 / par.pipeline
    kv_share = layers_here / par.decode_context  # DCP splits a sequence's KV over its ranks
    return MemoryBudget(
        budget=hw.memory_per_device_gib * spec.runtime.gpu_memory_utilization,
        weights=weights,
        reserve=RESERVE_GIB,
        hccl=(hccl_mb or 0) / 1024,
        kv_one_sequence=max_len * per_token * kv_share / GIB,
        kv_per_token_bytes=per_token * kv_share,
    )


def check(mem: MemoryBudget, path: str, max_len: int) -> tuple[str, str, bool] | None:
    """(message, fix, is_error) when the minimum does not fit (vLLM would refuse to start) or
    leaves less than NEAR_FRACTION of the budget; None when it fits with room."""
    left = mem.kv_available - mem.kv_one_sequence
    fix = (
        "spread the weights over more devices (tensor, or data with expert parallelism), use "
        "W8A8 weights, lower spec.model.maxModelLen, or raise gpuMemoryUtilization"
    )
    if left < 0:
        return (
            f"does not fit in memory per device: weights {mem.weights:.1f} GiB + reserve "
            f"{mem.reserve:.1f} + HCCL {mem.hccl:.1f} + KV for one {max_len}-token sequence "
            f"{mem.kv_one_sequence:.1f} = {mem.budget - left:.1f} GiB over a budget of "
            f"{mem.budget:.1f} GiB (estimate)",
            fix,
            True,
        )
    if left < NEAR_FRACTION * mem.budget:
        return (
            f"only {left:.1f} GiB of {mem.budget:.1f} GiB per device are left for KV beyond one "
            f"{max_len}-token sequence (estimate: weights {mem.weights:.1f}, reserve "
            f"{mem.reserve:.1f}, HCCL {mem.hccl:.1f})",
            fix,
            False,
        )
    return None
