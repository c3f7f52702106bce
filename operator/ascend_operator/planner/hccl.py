"""HCCL buffer sizing (HCCL_BUFFSIZE, in MB) for the planner.

The fused dispatch/combine formula lives with the kernels (``ascend_kernels.hccl``, pure
Python); the planner adds what deployments set.
"""

from __future__ import annotations

from ascend_kernels.hccl import (
    FUSED_MC2_MAX_EP,
    FUSED_MC2_OVERHEAD_MB,
    HCCL_DEFAULT_MB,
    fused_mc2_max_tokens,
    fused_mc2_required_mb,
)
from ascend_runtime.roles import Role

from ..api.spec import ModelDeploymentSpec, RoleSpec
from . import fused_mc2
from .architectures import Architecture
from .hardware import HardwareProfile
from .problems import Problem

MOE_EP_DEFAULT_MB = 512
"""What vllm-ascend's Qwen3-235B tutorial sets for MoE with expert parallelism."""

__all__ = [
    "FUSED_MC2_MAX_EP",
    "FUSED_MC2_OVERHEAD_MB",
    "HCCL_DEFAULT_MB",
    "MOE_EP_DEFAULT_MB",
    "fused_mc2_max_tokens",
    "fused_mc2_required_mb",
    "plan_buffer",
]


def plan_buffer(
    spec: ModelDeploymentSpec,
    arch: Architecture,
    hw: HardwareProfile,
    problems: list[Problem],
    *,
    path: str,
    role: RoleSpec,
    max_num_seqs: int | None,
    max_num_batched_tokens: int | None,
) -> int:
    """HCCL_BUFFSIZE in MB: the user's (checked against fused MC2), or planned."""
    runtime = spec.runtime
    explicit = role.hccl_buffer_size_mb or runtime.hccl_buffer_size_mb
    field_path = (
        f"{path}.hcclBufferSizeMb" if role.hccl_buffer_size_mb else "spec.runtime.hcclBufferSizeMb"
    )
    base = MOE_EP_DEFAULT_MB if (arch.is_moe and role.parallelism.expert) else (HCCL_DEFAULT_MB)
    if not fused_mc2.sizes_buffer(spec, role, arch, hw):
        return explicit or base
    tokens_field = "maxNumSeqs" if role.name == Role.DECODE else "maxNumBatchedTokens"
    tokens = max_num_seqs if role.name == Role.DECODE else max_num_batched_tokens
    if not tokens:
        problems.append(
            Problem(
                f"{path}.{tokens_field}",
                f"fused MC2 sizes HCCL_BUFFSIZE from the tokens per step, and {tokens_field} is "
                "not set",
                f"set spec.runtime.{tokens_field} (or on the role)",
            )
        )
        return explicit or base
    if not (arch.hidden_size and arch.experts_per_token):
        problems.append(
            Problem(
                "spec.model.architecture",
                "fused MC2 sizing needs hiddenSize and expertsPerToken",
                "name a preset (e.g. qwen3-235b-a22b) or set hiddenSize and expertsPerToken",
            )
        )
        return explicit or base
    # vllm-ascend splits a step's tokens over the tensor-parallel ranks before the MoE
    # dispatch (num_tokens_per_tp_rank), so each rank's window holds its share.
    tp = role.parallelism.tensor
    per_rank = -(-tokens // tp)
    need = fused_mc2_required_mb(per_rank, arch.experts_per_token, arch.hidden_size)
    if explicit is None:
        return max(base, need)
    if explicit < need:
        fit = fused_mc2_max_tokens(explicit, arch.experts_per_token, arch.hidden_size) * tp
        problems.append(
            Problem(
                field_path,
                f"HCCL_BUFFSIZE {explicit} MB is {need - explicit} MB short of what fused MC2 "
                f"needs: {tokens} tokens / TP {tp} = {per_rank} per rank x "
                f"top-{arch.experts_per_token} x hidden {arch.hidden_size} x 3 B "
                f"+ {FUSED_MC2_OVERHEAD_MB} MB = {need} MB",
                f"raise it to at least {need}, or lower {tokens_field} to at most {fit}",
            )
        )
    return explicit
