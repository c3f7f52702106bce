"""Seconds of one engine step from the planner's StepModel: a roofline per device (weights
actually touched and KV read against HBM bandwidth, FLOPs against the peak) plus the
collectives of every layer (tensor-parallel all-reduce, MoE dispatch and combine).

An instance's data-parallel ranks step together (MoE layers synchronise them), each with its
own sequences: the busiest rank sets the step's time."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import StepModel

DISPATCH_BYTES = 1
"""Bytes per hidden element a MoE dispatch sends (INT8, as vllm-ascend's MC2 with W8A8 and
the published DeepEP-Ascend figures do)."""
COMBINE_BYTES = 2
"""Bytes per hidden element a combine returns (BF16)."""
ACTIVATION_BYTES = 2

RankLoad = tuple[Sequence[tuple[int, int]], Sequence[int]]
"""One rank's step: prefill chunks as (tokens already computed, chunk), and the context length
of each decoding sequence."""


def step_seconds(m: StepModel, ranks: Sequence[RankLoad]) -> float:
    """One step of an instance whose data-parallel ranks carry `ranks`."""
    loads = [
        (sum(c for _, c in chunks) + len(contexts), chunks, contexts) for chunks, contexts in ranks
    ]
    tokens = sum(n for n, _, _ in loads)
    if tokens == 0:
        return 0.0
    busiest = max(n for n, _, _ in loads)
    weight_bytes = m.dense_weight_bytes
    if m.local_experts:
        routed = tokens if m.expert_parallel else busiest
        touched = 1 - (1 - m.experts_per_token / m.experts) ** routed
        weight_bytes += m.local_experts * touched * m.expert_weight_bytes
    core = 0.0
    for n, chunks, contexts in loads:
        # Decode reads each sequence's cache once; a prefill chunk reads the cached prefix once
        # and attends causally within itself.
        cached = sum(contexts) + sum(done for done, _ in chunks)
        pairs = sum(contexts) + sum(c * (done + (c + 1) / 2) for done, c in chunks)
        memory = (weight_bytes + m.kv_bytes_per_token * cached) / m.hbm_bytes_per_second
        compute = m.flops_per_token * n / m.matmul_flops_per_second
        compute += m.attention_flops_per_context_token * pairs / m.attention_flops_per_second
        core = max(core, memory, compute)
    return core + m.layers * _per_layer_collectives(m, busiest)


def spread(m: StepModel, prefills: Sequence[tuple[int, int]], contexts: Sequence[int]) -> list[
    RankLoad
]:  # fmt: skip
    """Prefill chunks and decoding sequences dealt round-robin over the ranks."""
    n = m.data_parallel
    return [(list(prefills[r::n]), list(contexts[r::n])) for r in range(n)]


def _per_layer_collectives(m: StepModel, per_rank: float) -> float:
    seconds = 0.0
    if m.tp_size > 1 and m.allreduces_per_layer:
        message = per_rank * m.hidden_size * ACTIVATION_BYTES
        ring = 2 * (m.tp_size - 1) / m.tp_size * message / m.tp_link_bytes_per_second
        seconds += m.allreduces_per_layer * ring
    if m.local_experts and m.expert_parallel:
        # vllm-ascend splits a rank's tokens over its TP devices before the dispatch.
        elements = per_rank / m.tp_size * m.experts_per_token * m.hidden_size
        moved = elements * DISPATCH_BYTES / m.moe_dispatch_bytes_per_second
        moved += elements * COMBINE_BYTES / m.moe_combine_bytes_per_second
        seconds += max(m.moe_floor_seconds_per_layer, moved)
    return seconds


def kv_transfer_seconds(m: StepModel, prompt_tokens: int) -> float:
    """PD: time for a prefill instance's devices to send one prompt's KV to decode."""
    return prompt_tokens * m.kv_transfer_bytes_per_token / m.kv_link_bytes_per_second
