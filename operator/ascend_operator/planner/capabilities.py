"""What each supported vllm-ascend release line can do, and how its flags are spelled.

A feature a line lacks becomes a validation problem naming the field, never a pod that
crash-loops. Sources: vllm-ascend release notes and docs (see docs/capabilities.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .additional_keys import READ_KEYS


@dataclass(frozen=True)
class RuntimeCapabilities:
    """Features and flag spellings of one vllm-ascend release line."""

    line: str
    """Release line, e.g. `v0.23`."""
    vllm: str
    """The matching vLLM release."""
    torchair: bool
    """TorchAir graph mode (`additional_config.torchair_graph_config`); removed in v0.13."""
    prefill_context_parallel: bool
    """PCP > 1 (`--prefill-context-parallel-size`); dropped on main in 2026-07 (#12728)."""
    decode_context_parallel: bool
    """DCP > 1 (`--decode-context-parallel-size`)."""
    rope_flag: Literal["hf-overrides", "rope-scaling"]
    """YaRN via `--hf-overrides {rope_parameters: ...}` (vLLM >= 0.12) or `--rope-scaling`."""
    fused_mc2: bool
    """`VLLM_ASCEND_ENABLE_FUSED_MC2` (dispatch_ffn_combine)."""
    kv_offload: bool
    """OffloadingConnector with `cpu_bytes_to_use`."""
    graph_limit: Literal["capped", "error"]
    """Too many capture sizes: v0.13 silently caps the graph count, later lines raise."""
    eplb_form: Literal["flat", "nested"]
    """EPLB keys at the top of the additional config (v0.11) or in `eplb_config`."""
    eplb_heat_stage: bool
    """`eplb_config.eplb_heat_collection_stage` exists (v0.23)."""
    npugraph_ex: Literal["none", "top-level", "compilation-config"]
    """Where `enable_npugraph_ex` lives: absent (v0.11), top level (v0.13), or in
    `ascend_compilation_config` (v0.18 on)."""
    vllm_block_hashes: bool = False
    """Precise kv-aware routing's copy of vLLM's block hashes was checked against this line's
    vLLM (tests/realvllm/test_vllm_block_hashes.py runs vLLM 0.32; every line here is older)."""
    additional_config_keys: frozenset[str] = field(repr=False, default=frozenset())
    """Top-level additional-config keys the line reads (`additional_keys`)."""


RUNTIME_LINES: dict[str, RuntimeCapabilities] = {
    "v0.11": RuntimeCapabilities(
        line="v0.11",
        vllm="0.11.0",
        torchair=True,
        prefill_context_parallel=False,
        decode_context_parallel=False,
        rope_flag="rope-scaling",
        fused_mc2=False,
        kv_offload=False,
        graph_limit="capped",
        eplb_form="flat",
        eplb_heat_stage=False,
        npugraph_ex="none",
        additional_config_keys=READ_KEYS["v0.11"],
    ),
    "v0.13": RuntimeCapabilities(
        line="v0.13",
        vllm="0.13.0",
        torchair=False,
        prefill_context_parallel=True,
        decode_context_parallel=True,
        rope_flag="hf-overrides",
        fused_mc2=True,
        kv_offload=False,
        graph_limit="capped",
        eplb_form="nested",
        eplb_heat_stage=False,
        npugraph_ex="top-level",
        additional_config_keys=READ_KEYS["v0.13"],
    ),
    "v0.18": RuntimeCapabilities(
        line="v0.18",
        vllm="0.18.0",
        torchair=False,
        prefill_context_parallel=True,
        decode_context_parallel=True,
        rope_flag="hf-overrides",
        fused_mc2=True,
        kv_offload=False,
        graph_limit="error",
        eplb_form="nested",
        eplb_heat_stage=False,
        npugraph_ex="compilation-config",
        additional_config_keys=READ_KEYS["v0.18"],
    ),
    "v0.23": RuntimeCapabilities(
        line="v0.23",
        vllm="0.23.0",
        torchair=False,
        prefill_context_parallel=False,
        decode_context_parallel=True,
        rope_flag="hf-overrides",
        fused_mc2=True,
        kv_offload=True,
        graph_limit="error",
        eplb_form="nested",
        eplb_heat_stage=True,
        npugraph_ex="compilation-config",
        additional_config_keys=READ_KEYS["v0.23"],
    ),
}

DEFAULT_VERSION = "v0.23.0"

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)")


def release_line(version: str) -> str | None:
    """`v0.23.0rc1` -> `v0.23`; None when it does not look like a version."""
    match = _VERSION_RE.match(version)
    return f"v{int(match.group(1))}.{int(match.group(2))}" if match else None


def capabilities_for(version: str) -> RuntimeCapabilities | None:
    """Capabilities of the line `version` belongs to, or None if that line is unsupported."""
    line = release_line(version)
    return RUNTIME_LINES.get(line) if line else None


def supported_lines() -> str:
    return ", ".join(f"{line}.x" for line in RUNTIME_LINES)
