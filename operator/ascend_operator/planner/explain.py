"""What the planner chose where vLLM's own default differs, and why (printed by `plan`)."""

from __future__ import annotations

from ..api.spec import VLLM_DEFAULT_CUDAGRAPH_MODE, ModelDeploymentSpec, RoleSpec

ENV_REASONS = {
    "PYTORCH_NPU_ALLOC_CONF": "expandable segments against fragmentation, as every vllm-ascend "
    "deployment guide sets it",
    "HCCL_BUFFSIZE": "HCCL's default is 200 MB; MoE with expert parallelism gets 512 "
    "(vllm-ascend's Qwen3-235B tutorial; its CI runs 1024, DeepSeek 2048), fused MC2 what "
    "dispatch_ffn_combine needs",
    "HCCL_OP_EXPANSION_MODE": "collectives expanded on the vector cores, as vllm-ascend's "
    "guides set it (written for A3; set on A2 too)",
    "OMP_PROC_BIND": "OpenMP threads not pinned, as vllm-ascend's guides set it",
    "OMP_NUM_THREADS": "one OpenMP thread per process, as vllm-ascend's Qwen3-235B tutorial "
    "(its W8A8 CI config uses 100)",
    "TASK_QUEUE_ENABLE": "torch_npu's asynchronous operator queue, as vllm-ascend's guides set it",
    "VLLM_ASCEND_ENABLE_FLASHCOMM1": "MoE with TP > 1: vllm-ascend's FlashComm for those "
    "layers, as its Qwen3-235B configs set it",
    "GLOO_SOCKET_IFNAME": "the node NIC (spec.hardware.networkInterface)",
    "TP_SOCKET_IFNAME": "the node NIC (spec.hardware.networkInterface)",
    "HCCL_SOCKET_IFNAME": "the node NIC (spec.hardware.networkInterface)",
}
"""Why each environment variable the planner sets on vLLM pods is there."""


def chosen_defaults(
    spec: ModelDeploymentSpec, role: RoleSpec, env: dict[str, str], graph_mode: str
) -> list[str]:
    """One line per choice of ours that the user did not write and vLLM would not make."""
    runtime = spec.runtime
    if runtime.engine != "vllm":
        return []
    written = set(runtime.env) | set(role.env)
    out = [
        f"{name}={value}: {ENV_REASONS[name]}"
        for name, value in env.items()
        if name in ENV_REASONS and name not in written
    ]
    fields = runtime.model_fields_set
    mode = role.cudagraph_mode or runtime.cudagraph_mode
    if (
        graph_mode == "aclgraph"
        and "cudagraph_mode" not in fields
        and role.cudagraph_mode is None
        and mode != VLLM_DEFAULT_CUDAGRAPH_MODE
    ):
        out.append(
            f"cudagraph_mode {mode}: vLLM's default is {VLLM_DEFAULT_CUDAGRAPH_MODE}; "
            "vllm-ascend's guides capture full graphs for decode only"
        )
    if graph_mode != "eager" and spec.model.task != "embed" and "async_scheduling" not in fields:
        out.append(
            "--async-scheduling: off in vLLM by default; vllm-ascend's guides turn it on "
            "(spec.runtime.asyncScheduling)"
        )
    if "block_size" not in fields:
        out.append(
            f"--block-size {runtime.block_size}: vLLM's default is 16; Ascend's attention "
            "works on 128-token blocks"
        )
    return out
