"""The top-level `--additional-config` keys each vllm-ascend release line reads.

Collected from the release tags' `vllm_ascend/` sources (every `additional_config.get(key)`,
`additional_config[key]`, `key in additional_config` and `_get_config_value(additional_config,
key, ...)`). vllm-ascend ignores any other key without a word, so the planner warns about one:
a misspelt or retired key (vllm-ascend's own nightly configs still pass some) has no effect.
"""

from __future__ import annotations

_V0_11 = """
ascend_scheduler_config chunked_prefill_for_mla dynamic_eplb enable_cpu_binding
enable_shared_expert_dp eplb_policy_type expert_map_path expert_map_record_path gate_eplb
init_redundancy_expert kv_cache_dtype lmhead_tensor_parallel_size
multistream_overlap_shared_expert num_iterations_eplb_update num_wait_worker_iterations
oproj_tensor_parallel_size recompute_scheduler_enable refresh torchair_graph_config
weight_prefetch_config
"""

_V0_13 = """
SLO_limits_for_dynamic_batch ascend_compilation_config dump_config_path dynamic_eplb
enable_async_exponential enable_cpu_binding enable_kv_nz enable_npugraph_ex
enable_shared_expert_dp eplb_config eplb_policy_type expert_map_path expert_map_record_path
finegrained_tp_config gate_eplb init_redundancy_expert layer_sharding mix_placement
multistream_overlap_gate multistream_overlap_shared_expert num_iterations_eplb_update
num_wait_worker_iterations pa_shape_list recompute_scheduler_enable refresh
weight_prefetch_config xlite_graph_config
"""

_V0_18 = """
SLO_limits_for_dynamic_batch ascend_compilation_config ascend_fusion_config dump_config_path
enable_async_exponential enable_cpu_binding enable_kv_nz enable_mc2_hierarchy_comm
enable_shared_expert_dp enable_sparse_c8 eplb_config finegrained_tp_config layer_sharding
multistream_overlap_gate multistream_overlap_shared_expert pa_shape_list
recompute_scheduler_enable refresh weight_prefetch_config xlite_graph_config
"""

_V0_23 = """
SLO_limits_for_dynamic_batch ascend_compilation_config ascend_fusion_config ascend_log_path
c8_enable_reshape_optim dp_allreduce_on_npu dump_config dump_config_path
enable_async_exponential enable_balance_scheduling enable_cpu_binding enable_dsa_cp
enable_flashcomm1 enable_flashcomm2_parallel_size enable_fused_mc2 enable_hamming_sparse
enable_kv_nz enable_matmul_allreduce enable_mc2_hierarchy_comm enable_mlapo enable_prefill_mc2
enable_reduce_sample enable_shared_expert_dp enable_sleep_mode_extra_cleanup
enable_sparse_li_c8 enable_sparse_sfa_c8 enable_transpose_kv_cache_by_block eplb_config
finegrained_tp_config hamming_sparse layer_sharding mega_moe_max_tokens mix_placement
msmonitor_use_daemon multistream_dsv4_dsa_overlap multistream_overlap_gate
multistream_overlap_shared_expert pa_shape_list profiling_chunk_config
recompute_scheduler_enable refresh rejection_sampler_config weight_nz_mode
weight_prefetch_config xlite_graph_config
"""

READ_KEYS: dict[str, frozenset[str]] = {
    "v0.11": frozenset(_V0_11.split()),
    "v0.13": frozenset(_V0_13.split()),
    "v0.18": frozenset(_V0_18.split()),
    "v0.23": frozenset(_V0_23.split()),
}
"""Release line -> the top-level keys its sources read."""
