"""The sim engine's capacity and latency, derived from the plan. With a known architecture the
engine gets a StepModel: per-device weight bytes actually touched, KV read, FLOPs against the
peak (INT8 for W8A8), and the collectives of every layer, from the published figures in
`hardware`; the KV capacity counts heads replicated over tensor-parallel ranks. Otherwise a
linear model (prefill compute-bound, decode bandwidth-bound) keeps realistic shapes."""

from __future__ import annotations

import math

from ascend_runtime.config import SimSettings, StepModel
from ascend_runtime.roles import Role

from ..api.spec import ModelDeploymentSpec, RoleSpec
from . import kv_aware
from .architectures import Architecture
from .graphs import DEFAULT_MAX_NUM_SEQS
from .hardware import INT8_PER_BF16, INTERNODE_GBPS, HardwareProfile

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
    step = step_model(spec, role, arch, hw)
    if step is not None and step.kv_bytes_per_token:
        # Per device: what weights leave, over the KV one token takes there (replicated heads
        # count on every device that holds them); every data-parallel rank has its own cache.
        weights = step.dense_weight_bytes + step.local_experts * step.expert_weight_bytes
        free = hw.memory_per_device_gib * GIB * runtime.gpu_memory_utilization - weights
        tokens = free / step.kv_bytes_per_token * par.data
        blocks = max(16, math.floor(tokens / runtime.block_size))
    elif kv_token and arch.total_params_b:
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
        step_model=step,
        prefix_caching=kv_aware.prefix_caching(spec) or None,
        kv_events=kv_aware.kv_events(spec, role.name),
    )


def step_model(
    spec: ModelDeploymentSpec, role: RoleSpec, arch: Architecture, hw: HardwareProfile
) -> StepModel | None:
    """Per-device step costs of one instance of `role`, or None when the architecture lacks
    the sizes they need."""
    if not (
        arch.total_params_b and arch.active_params_b and arch.num_layers and arch.hidden_size
        and arch.num_attention_heads and arch.num_kv_heads and arch.head_dim
    ):  # fmt: skip
        return None
    par = role.parallelism
    tp, dp = par.tensor * par.prefill_context, par.data
    total, active = arch.total_params_b * 1e9, arch.active_params_b * 1e9
    experts, k = arch.num_experts or 0, arch.experts_per_token or 0
    per_expert = (total - active) / (experts - k) if experts > k else 0.0
    dense = active - k * per_expert
    per_param = bytes_per_param(spec.model.quantization)
    ep = par.expert and experts > 0
    layers = arch.num_layers
    if arch.mla:  # absorbed MLA: one latent row of head_dim (512 + 64 rope) per token
        kv_device = layers * arch.head_dim * 2 / par.decode_context
        attention = 2 * arch.num_attention_heads * (2 * arch.head_dim - 64) * layers / tp
    else:
        heads = max(arch.num_kv_heads / tp, 1.0)  # fewer KV heads than ranks: replicated
        kv_device = layers * 2 * heads * arch.head_dim * 2 / par.decode_context
        attention = 4 * arch.num_attention_heads * arch.head_dim * layers / tp
    bf16 = hw.peak_tflops_bf16 * 1e12
    int8 = spec.model.quantization != "none"
    dispatch, combine = hw.moe_bandwidth(tp * dp)
    kv_token = kv_bytes_per_token(arch) or 0
    return StepModel(
        data_parallel=dp,
        layers=layers,
        dense_weight_bytes=dense * per_param / tp,
        expert_weight_bytes=per_expert * per_param / (1 if ep else tp),
        local_experts=experts / (tp * dp) if ep else float(experts),
        experts=experts,
        experts_per_token=k,
        expert_parallel=ep,
        flops_per_token=2 * (dense + k * per_expert) / tp,
        attention_flops_per_context_token=attention,
        kv_bytes_per_token=kv_device,
        hbm_bytes_per_second=hw.hbm_gbps * 1e9,
        matmul_flops_per_second=bf16 * (INT8_PER_BF16 if int8 else 1.0),
        attention_flops_per_second=bf16,
        tp_size=tp,
        hidden_size=arch.hidden_size,
        tp_link_bytes_per_second=hw.tp_link_bytes_per_second,
        allreduces_per_layer=1 if ep else 2,
        moe_floor_seconds_per_layer=hw.moe_floor_seconds(tp * dp) if ep else 0.0,
        moe_dispatch_bytes_per_second=dispatch,
        moe_combine_bytes_per_second=combine,
        kv_transfer_bytes_per_token=kv_token / tp,
        kv_link_bytes_per_second=INTERNODE_GBPS * 1e9,
    )
