"""The sim engine's capacity and latency, derived from the plan: prefill is compute-bound,
decode is bandwidth-bound. Approximate by design: it gives the sim realistic shapes (TTFT
grows with prompt length, ITL with batch and context), not predictions."""

from __future__ import annotations

import math

from ascend_runtime.config import SimSettings
from ascend_runtime.roles import Role

from ..api.spec import ModelDeploymentSpec, RoleSpec
from .architectures import Architecture
from .graphs import DEFAULT_MAX_NUM_SEQS
from .hardware import HardwareProfile

PREFILL_MFU = 0.35
"""Fraction of peak compute a prefill step reaches."""
DECODE_BW_EFFICIENCY = 0.6
"""Fraction of HBM bandwidth a decode step reaches."""
DEFAULT_BATCHED_TOKENS = 8192
DEFAULT_SIM_CONTEXT = 4096
GIB = 1024**3


def bytes_per_param(quantization: str) -> float:
    return {"none": 2.0, "w8a8": 1.0, "w8a8-dynamic": 1.0, "w4a8": 0.5}[quantization]


def kv_bytes_per_token(arch: Architecture) -> int | None:
    """KV bytes one token occupies across all layers (bf16)."""
    if not (arch.num_layers and arch.head_dim and arch.num_kv_heads):
        return None
    factor = 1 if arch.mla else 2  # MLA caches one latent row; MHA/GQA cache K and V
    return arch.num_layers * arch.num_kv_heads * arch.head_dim * factor * 2


def sim_settings(
    spec: ModelDeploymentSpec, role: RoleSpec, arch: Architecture, hw: HardwareProfile
) -> SimSettings:
    """Capacity and latency of one instance of `role` for the sim engine."""
    par, runtime = role.parallelism, spec.runtime
    rank_devices = par.tensor * par.pipeline * par.prefill_context
    devices = rank_devices * par.data
    per_param = bytes_per_param(spec.model.quantization)
    seqs = (role.max_num_seqs or runtime.max_num_seqs or DEFAULT_MAX_NUM_SEQS) * par.data
    batched = (
        role.max_num_batched_tokens or runtime.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS
    ) * par.data
    prefill_tps = decode_step = per_kv_token = 0.0
    if arch.active_params_b:
        active = arch.active_params_b * 1e9
        prefill_tps = hw.peak_tflops_bf16 * 1e12 * devices * PREFILL_MFU / (2 * active)
        decode_step = active * per_param / (hw.hbm_gbps * 1e9 * rank_devices * DECODE_BW_EFFICIENCY)
    kv_token = kv_bytes_per_token(arch)
    if kv_token:
        per_kv_token = kv_token / (hw.hbm_gbps * 1e9 * devices * DECODE_BW_EFFICIENCY)
    blocks = 8192
    if kv_token and arch.total_params_b:
        weights = arch.total_params_b * 1e9 * per_param
        free = hw.memory_per_device_gib * GIB * devices * runtime.gpu_memory_utilization - weights
        blocks = max(16, math.floor(free / (kv_token * runtime.block_size)))
    sim = runtime.sim
    if sim.kv_cache_blocks:
        blocks = sim.kv_cache_blocks
    return SimSettings(
        block_size=runtime.block_size,
        num_blocks=blocks,
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        max_model_len=spec.model.max_model_len or DEFAULT_SIM_CONTEXT,
        seed=runtime.seed or 0,
        prefill_tokens_per_second=prefill_tps,
        decode_step_seconds=decode_step,
        decode_seconds_per_kv_token=per_kv_token,
        fixed_ttft_seconds=None if sim.fixed_ttft_ms is None else sim.fixed_ttft_ms / 1000,
        fixed_itl_seconds=None if sim.fixed_itl_ms is None else sim.fixed_itl_ms / 1000,
        kv_transfer_timeout_seconds=sim.kv_transfer_timeout_seconds,
        # PD roles move real KV bytes between simulated ranks: the rank map needs the heads.
        kv_heads=arch.num_kv_heads if role.name != Role.UNIFIED else None,
        kv_mla=arch.mla if role.name != Role.UNIFIED and arch.num_kv_heads else None,
    )
