"""HCCL buffer requirements of fused MoE dispatch/combine (pure functions, no torch).

vllm-ascend's ``dispatch_ffn_combine`` (fused MC2: W8A8, expert parallelism up to 32, no MTP)
checks ``tokens x topK x hidden x 3 bytes + 10 MB <= HCCL_BUFFSIZE`` (MB; HCCL's default is
200), and pads its synchronisation area of EP x experts-per-rank int32 counters to a multiple
of 128 integers (512 bytes).
"""

from __future__ import annotations

import math

HCCL_DEFAULT_MB = 200
"""HCCL's own default HCCL_BUFFSIZE."""
FUSED_MC2_OVERHEAD_MB = 10
FUSED_MC2_MAX_EP = 32
BYTES_PER_TOKEN_ELEMENT = 3
SYNC_ALIGN_INTS = 128
MIB = 1024 * 1024


def fused_mc2_required_mb(tokens: int, top_k: int, hidden_size: int) -> int:
    """HCCL_BUFFSIZE (MB) that fused dispatch/combine needs for `tokens` per step."""
    if min(tokens, top_k, hidden_size) < 0:
        raise ValueError("tokens, top_k and hidden_size must be >= 0")
    data = tokens * top_k * hidden_size * BYTES_PER_TOKEN_ELEMENT
    return math.ceil(data / MIB) + FUSED_MC2_OVERHEAD_MB


def fused_mc2_max_tokens(buffer_mb: int, top_k: int, hidden_size: int) -> int:
    """The most tokens per step that a buffer of `buffer_mb` MB admits (inverse of the above)."""
    if top_k <= 0 or hidden_size <= 0:
        raise ValueError("top_k and hidden_size must be > 0")
    usable = (buffer_mb - FUSED_MC2_OVERHEAD_MB) * MIB
    return max(0, usable // (top_k * hidden_size * BYTES_PER_TOKEN_ELEMENT))


def sync_area_bytes(ep_size: int, experts_per_rank: int) -> int:
    """Bytes of the EP x experts-per-rank int32 counters, padded to 128 integers."""
    ints = ep_size * experts_per_rank
    return math.ceil(ints / SYNC_ALIGN_INTS) * SYNC_ALIGN_INTS * 4
