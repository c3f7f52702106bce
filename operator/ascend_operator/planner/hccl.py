"""HCCL buffer sizing (HCCL_BUFFSIZE, in MB)."""

from __future__ import annotations

import math

HCCL_DEFAULT_MB = 200
"""HCCL's own default."""
MOE_EP_DEFAULT_MB = 512
"""What vllm-ascend's Qwen3-235B tutorial sets for MoE with expert parallelism."""
FUSED_MC2_OVERHEAD_MB = 10
FUSED_MC2_MAX_EP = 32


def fused_mc2_required_mb(tokens: int, top_k: int, hidden_size: int) -> int:
    """dispatch_ffn_combine's check: tokens x topK x hidden x 3 bytes + 10 MB <= HCCL_BUFFSIZE."""
    return math.ceil(tokens * top_k * hidden_size * 3 / (1024 * 1024)) + FUSED_MC2_OVERHEAD_MB


def fused_mc2_max_tokens(buffer_mb: int, top_k: int, hidden_size: int) -> int:
    """The most tokens per step a buffer of `buffer_mb` admits (inverse of the above)."""
    usable = (buffer_mb - FUSED_MC2_OVERHEAD_MB) * 1024 * 1024
    return max(0, usable // (top_k * hidden_size * 3))
