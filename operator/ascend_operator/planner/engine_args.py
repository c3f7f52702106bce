"""Static `vllm serve` flags and environment of one role (per-pod flags are added at start by
`ascend_runtime.engine_command`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..api.spec import VLLM_DEFAULT_CUDAGRAPH_MODE, ModelDeploymentSpec, RoleSpec
from . import additional_config, fused_mc2, kv_aware
from .architectures import Architecture
from .capabilities import RuntimeCapabilities
from .model_source import model_env
from .names import MODEL_MOUNT


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class RoleEngineSettings:
    """Role-level decisions the flags are built from."""

    graph_mode: str
    cudagraph_mode: str
    """The role's, else spec.runtime's."""
    capture_sizes: tuple[int, ...] | None
    """Passed explicitly only when set by the user or required by MTP."""
    num_speculative_tokens: int | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    hccl_buffer_mb: int
    offload_cpu_bytes: int


def vllm_args(
    spec: ModelDeploymentSpec,
    role: RoleSpec,
    settings: RoleEngineSettings,
    *,
    arch: Architecture,
    caps: RuntimeCapabilities,
    http_port: int,
    pd: bool,
) -> list[str]:
    """Flags shared by every pod of the role, in a stable order."""
    model, runtime, par = spec.model, spec.runtime, role.parallelism
    args = ["--served-model-name", model.name, "--host", "0.0.0.0", "--port", str(http_port)]
    args += ["--tensor-parallel-size", str(par.tensor)]
    if par.pipeline > 1:
        args += ["--pipeline-parallel-size", str(par.pipeline)]
    if par.prefill_context > 1:
        args += ["--prefill-context-parallel-size", str(par.prefill_context)]
    if par.decode_context > 1:
        args += ["--decode-context-parallel-size", str(par.decode_context)]
    if (par.prefill_context > 1 or par.decode_context > 1) and (pd or settings.offload_cpu_bytes):
        # With PD or a KV pool the interleave must equal the block size.
        args += ["--cp-kv-cache-interleave-size", str(runtime.block_size)]
    if par.expert:
        args += ["--enable-expert-parallel"]
    if model.dtype != "auto":
        args += ["--dtype", model.dtype]
    if model.quantization != "none":
        args += ["--quantization", "ascend"]
    if model.max_model_len:
        args += ["--max-model-len", str(model.max_model_len)]
    if settings.max_num_seqs:
        args += ["--max-num-seqs", str(settings.max_num_seqs)]
    if settings.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(settings.max_num_batched_tokens)]
    args += ["--gpu-memory-utilization", f"{runtime.gpu_memory_utilization:g}"]
    args += ["--block-size", str(runtime.block_size)]
    if model.trust_remote_code:
        args += ["--trust-remote-code"]
    if runtime.seed is not None:
        args += ["--seed", str(runtime.seed)]
    if model.rope_scaling is not None:
        rope = model.rope_scaling
        params: dict[str, object] = {"rope_type": rope.type}
        theta = rope.rope_theta or arch.rope_theta
        if theta:
            params["rope_theta"] = int(theta) if float(theta).is_integer() else theta
        params["factor"] = int(rope.factor) if float(rope.factor).is_integer() else rope.factor
        params["original_max_position_embeddings"] = rope.original_max_position_embeddings
        if caps.rope_flag == "hf-overrides":
            # vLLM 0.32 stopped raising the derived context limit by the YaRN factor
            # (`--max-model-len 131072` then fails "greater than the derived max_model_len");
            # the extended length as max_position_embeddings works on both behaviours and
            # does not change YaRN's numbers (they use original_max_position_embeddings).
            extended = int(rope.factor * rope.original_max_position_embeddings)
            overrides = {"rope_parameters": params, "max_position_embeddings": extended}
            args += ["--hf-overrides", _json(overrides)]
        else:
            args += ["--rope-scaling", _json(params)]
    if model.task == "embed":
        # Pooling runner with the embedding conversion (vLLM >= 0.10.2; `--task embed` before).
        args += ["--runner", "pooling", "--convert", "embed"]
    caching = kv_aware.prefix_caching(spec)
    if caching is not None:
        args += ["--enable-prefix-caching" if caching else "--no-enable-prefix-caching"]
    args += kv_aware.vllm_args(spec, role.name)
    args += graph_args(settings)
    extra_config = additional_config.render(spec, role, caps, torchair_config(settings))
    if extra_config:
        args += ["--additional-config", _json(extra_config)]
    if runtime.async_scheduling and settings.graph_mode != "eager" and model.task != "embed":
        args += ["--async-scheduling"]
    if settings.num_speculative_tokens and runtime.speculative:
        speculative: dict[str, object] = {"method": runtime.speculative.method}
        if runtime.speculative.draft_model:
            speculative["model"] = draft_model_path(spec)
        speculative["num_speculative_tokens"] = settings.num_speculative_tokens
        if runtime.speculative and runtime.speculative.disable_padded_drafter_batch:
            speculative["disable_padded_drafter_batch"] = True
        args += ["--speculative-config", _json(speculative)]
    if settings.offload_cpu_bytes and not pd:
        cross_layer = runtime.kv_offload is not None and runtime.kv_offload.cross_layer_layout
        connector = offload_connector(settings.offload_cpu_bytes, cross_layer)
        args += ["--kv-transfer-config", _json(connector)]
    args += list(runtime.extra_args) + list(role.extra_args)
    return args


def draft_model_path(spec: ModelDeploymentSpec) -> str | None:
    """Where the engine finds the Eagle3 draft: under the model volume's mount, or the
    Hugging Face id as written."""
    draft = spec.runtime.speculative.draft_model if spec.runtime.speculative else None
    if draft is None or spec.model.source.hugging_face is not None:
        return draft
    return f"{MODEL_MOUNT}/{draft.strip('/')}"


def offload_connector(cpu_bytes: int, cross_layer: bool = False) -> dict[str, object]:
    """vLLM's OffloadingConnector to host memory: ascend-serve's cross-layer pool
    (AscendOffloadingSpec, `cpu_bytes_per_rank`), or vLLM's own spec (`cpu_bytes_to_use`,
    vLLM 0.23)."""
    extra: dict[str, object] = {"cpu_bytes_to_use": cpu_bytes}
    if cross_layer:
        extra = {
            "spec_name": "AscendOffloadingSpec",
            "spec_module_path": "ascend_runtime.kv.vllm_offload",
            "cpu_bytes_per_rank": cpu_bytes,
            "kv_layout": "cross_layer",
        }
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def torchair_config(settings: RoleEngineSettings) -> dict[str, object] | None:
    """`torchair_graph_config` of a TorchAir role (part of its additional config), else None."""
    if settings.graph_mode != "torchair":
        return None
    torchair: dict[str, object] = {"enabled": True}
    if settings.capture_sizes:
        torchair["graph_batch_sizes"] = list(settings.capture_sizes)
    return torchair


def graph_args(settings: RoleEngineSettings) -> list[str]:
    """Graph-mode flags: eager, or ACLGraph's compilation config (left out at vLLM's
    defaults); TorchAir's settings go in the additional config."""
    if settings.graph_mode == "eager":
        return ["--enforce-eager"]
    if settings.graph_mode == "torchair":
        return []
    compilation: dict[str, object] = {}
    if settings.cudagraph_mode != VLLM_DEFAULT_CUDAGRAPH_MODE:
        compilation["cudagraph_mode"] = settings.cudagraph_mode
    if settings.capture_sizes:
        compilation["cudagraph_capture_sizes"] = list(settings.capture_sizes)
    return ["--compilation-config", _json(compilation)] if compilation else []


def role_environment(
    spec: ModelDeploymentSpec,
    role: RoleSpec,
    settings: RoleEngineSettings,
    arch: Architecture,
) -> dict[str, str]:
    """Static environment of the role's engine pods: ours less the user's unsetEnv names, then
    the user's env (it wins)."""
    env: dict[str, str] = {}
    if spec.runtime.engine == "vllm":
        env |= {
            "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
            "HCCL_BUFFSIZE": str(settings.hccl_buffer_mb),
            "HCCL_OP_EXPANSION_MODE": "AIV",
            "OMP_PROC_BIND": "false",
            "OMP_NUM_THREADS": "1",
            "TASK_QUEUE_ENABLE": "1",
        }
        if arch.is_moe and role.parallelism.tensor > 1:
            env["VLLM_ASCEND_ENABLE_FLASHCOMM1"] = "1"
        env |= additional_config.environment(spec, role)
        mc2 = fused_mc2.env_value(spec, role)
        if mc2 is not None:
            env[fused_mc2.ENV] = mc2
        env |= kv_aware.vllm_env(spec, role.name)
        if spec.hardware is not None:
            nic = spec.hardware.network_interface
            env |= {"GLOO_SOCKET_IFNAME": nic, "TP_SOCKET_IFNAME": nic, "HCCL_SOCKET_IFNAME": nic}
    env |= model_env(spec)
    for name in (*spec.runtime.unset_env, *role.unset_env):
        env.pop(name, None)
    env |= spec.runtime.env
    env |= role.env
    return env
