"""Fused MC2 (`VLLM_ASCEND_ENABLE_FUSED_MC2`): the value each role gets, and where vllm-ascend
falls back to the unfused MoE communication.

vllm-ascend reads 0 (off), 1 (`dispatch_ffn_combine`) or 2 (`dispatch_gmm_combine_decode`,
decode steps only) and picks the fused kernel only on A3 nodes, with expert parallelism, and for
`dispatch_ffn_combine` with W8A8 dynamic weights and at most 32 expert-parallel ranks; otherwise
it quietly uses MC2 or all-to-all. A fallback therefore is no reason to refuse a spec (its PD CI
sets 2 with BF16 weights), but the user should hear about it: the planner reports each one as a
warning.
"""

from __future__ import annotations

from collections.abc import Iterator

from ascend_kernels.hccl import FUSED_MC2_MAX_EP
from ascend_runtime.roles import Role

from ..api.spec import ModelDeploymentSpec, RoleSpec
from .architectures import Architecture
from .hardware import HardwareProfile

ENV = "VLLM_ASCEND_ENABLE_FUSED_MC2"
KERNEL_VALUES = {"dispatch_ffn_combine": "1", "dispatch_gmm_combine_decode": "2"}
W8A8 = ("w8a8", "w8a8-dynamic")


def env_value(spec: ModelDeploymentSpec, role: RoleSpec) -> str | None:
    """The role's `VLLM_ASCEND_ENABLE_FUSED_MC2`, or None to leave it unset.

    The decode kernel is off on prefill roles ("0", as vllm-ascend's PD configs write it)."""
    runtime = spec.runtime
    if not runtime.fused_mc2:
        return None
    if runtime.fused_mc2_kernel == "dispatch_gmm_combine_decode" and role.name == Role.PREFILL:
        return "0"
    return KERNEL_VALUES[runtime.fused_mc2_kernel]


def fallback(
    spec: ModelDeploymentSpec, role: RoleSpec, arch: Architecture, hw: HardwareProfile
) -> tuple[str, str] | None:
    """(why vllm-ascend would not use the fused kernel on this role, what to do), or None when
    it would (or when fused MC2 is off there)."""
    if env_value(spec, role) in (None, "0"):
        return None
    return next(_fallbacks(spec, role, arch, hw), None)


def _fallbacks(
    spec: ModelDeploymentSpec, role: RoleSpec, arch: Architecture, hw: HardwareProfile
) -> Iterator[tuple[str, str]]:
    if not arch.is_moe:
        yield (
            "the model has no MoE layers (architecture.numExperts), so it has no effect",
            "set fusedMc2: false, or describe the architecture (preset or numExperts)",
        )
    if hw.name == "A2":
        yield (
            "vllm-ascend uses the fused kernels on A3 nodes only; on A2 it runs MC2 or "
            "all-to-all instead",
            "set fusedMc2: false on A2",
        )
    par = role.parallelism
    if not par.expert:
        yield (
            "without expert parallelism the MoE layers use all-gather, not MC2",
            "set parallelism.expert: true",
        )
    if spec.runtime.fused_mc2_kernel != "dispatch_ffn_combine":
        return
    if spec.model.quantization not in W8A8:
        yield (
            f"dispatch_ffn_combine needs W8A8 dynamic weights and quantization is "
            f"{spec.model.quantization}: vllm-ascend runs unfused MC2",
            "use W8A8 weights (msModelSlim), or fusedMc2Kernel: dispatch_gmm_combine_decode "
            "(what vllm-ascend's BF16 PD CI runs on decode)",
        )
    ep = par.tensor * par.data
    if ep > FUSED_MC2_MAX_EP:
        yield (
            f"dispatch_ffn_combine supports at most {FUSED_MC2_MAX_EP} expert-parallel ranks; "
            f"tensor {par.tensor} x data {par.data} = {ep}: vllm-ascend runs unfused MC2",
            f"keep tensor x data <= {FUSED_MC2_MAX_EP} to use it",
        )


def sizes_buffer(
    spec: ModelDeploymentSpec, role: RoleSpec, arch: Architecture, hw: HardwareProfile
) -> bool:
    """Whether HCCL_BUFFSIZE must hold `dispatch_ffn_combine`'s window on this role (the
    kernel checks it and fails when it is short)."""
    return (
        env_value(spec, role) == KERNEL_VALUES["dispatch_ffn_combine"]
        and fallback(spec, role, arch, hw) is None
    )
