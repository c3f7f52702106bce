"""Graph capture sizes (ACLGraph) and their rules with MTP speculative decoding."""

from __future__ import annotations

import math

DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's default concurrent sequences per engine rank."""


def default_capture_sizes(max_size: int) -> list[int]:
    """vLLM's default list: 1, 2, 4, multiples of 8 below 256, then multiples of 16."""
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, max_size + 1, 16)]
    return [s for s in sizes if s <= max_size]


def consumer_request_slots(max_requests: int, tokens_per_request: int) -> int:
    """Request slots a KV consumer (decode in PD) needs when graphs hold N + 1 tokens per
    request: requests arrive from prefill with one token, so extra slots are padded in
    (vllm-ascend #3526). Applied only when N + 1 > 1."""
    if tokens_per_request <= 1:
        return max_requests
    return (
        max_requests
        + math.ceil(max_requests / 16)
        + math.ceil(max_requests * tokens_per_request / 256)
    )


def mtp_capture_sizes(max_requests: int, tokens_per_request: int) -> list[int]:
    """Capture sizes in tokens for uniform decode batches of N + 1 tokens per request."""
    return [s * tokens_per_request for s in default_capture_sizes(max_requests)]


ENCODER_MAX_CAPTURE_TOKENS = 8192
"""Largest encoder batch (in tokens) captured by default for task: embed: bge-m3's context."""


def encoder_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture encoder (embedding) graphs for: powers of two up to the batch
    token budget, plus the budget itself. Embedding batches are whole prompts of any length,
    so a few geometric buckets waste at most half a batch of padding and keep the number of
    graphs small (ACLGraph's stream budget is shared across layers)."""
    cap = min(max_tokens, ENCODER_MAX_CAPTURE_TOKENS)
    sizes = [1 << i for i in range(cap.bit_length()) if 1 << i <= cap]
    return sorted({*sizes, cap})
