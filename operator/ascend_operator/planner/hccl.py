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

MOE_EP_DEFAULT_MB = 512
"""What vllm-ascend's Qwen3-235B tutorial sets for MoE with expert parallelism."""

__all__ = [
    "FUSED_MC2_MAX_EP",
    "FUSED_MC2_OVERHEAD_MB",
    "HCCL_DEFAULT_MB",
    "MOE_EP_DEFAULT_MB",
    "fused_mc2_max_tokens",
    "fused_mc2_required_mb",
]
