"""KV offload to ascend-serve's host pool through vLLM's OffloadingConnector: the
`AscendOffloadingSpec` of whichever vLLM line is installed.

Load it out of tree::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"spec_name": "AscendOffloadingSpec",
            "spec_module_path": "ascend_runtime.kv.vllm_offload",
            "cpu_bytes_per_rank": 68719476736, "kv_layout": "cross_layer"}}'

vLLM 0.3x redesigned the interface (a spec built from an `OffloadingConfig`, per-key lookups,
a worker with submit_store/submit_load over canonical page tensors): `vllm_offload_032`
implements it; `vllm_offload_023` keeps the 0.2x interface that vllm-ascend v0.23 runs.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("vllm.v1.kv_offload.base") is not None:
    from .vllm_offload_032 import AscendOffloadingSpec
else:
    from .vllm_offload_023 import AscendOffloadingSpec  # type: ignore[assignment]

__all__ = ["AscendOffloadingSpec"]
