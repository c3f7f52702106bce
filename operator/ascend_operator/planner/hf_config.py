"""Architecture facts from a model's Hugging Face `config.json` (pure: the CLI reads the file).

Used where a spec names no preset: the planner's head and memory checks then know the model
without the user copying numbers out of its config.
"""

from __future__ import annotations

import copy
from typing import Any

_INT_FIELDS = {
    "hidden_size": "hiddenSize",
    "num_hidden_layers": "numLayers",
    "num_attention_heads": "numAttentionHeads",
    "num_key_value_heads": "numKvHeads",
    "head_dim": "headDim",
    "num_experts": "numExperts",
    "n_routed_experts": "numExperts",
    "num_experts_per_tok": "expertsPerToken",
    "num_nextn_predict_layers": "mtpLayers",
}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def architecture_fields(config: Any) -> dict[str, Any]:
    """camelCase architecture fields a config.json states (unknown or odd values left out)."""
    if not isinstance(config, dict):
        return {}
    out: dict[str, Any] = {}
    for key, field in _INT_FIELDS.items():
        n = _count(config.get(key))
        if n is not None and (n > 0 or field in ("numExperts", "mtpLayers")):
            out.setdefault(field, n)
    lora, rope = _count(config.get("kv_lora_rank")), _count(config.get("qk_rope_head_dim"))
    if lora and rope is not None:  # MLA: one latent row per layer and token
        out["mla"] = True
        out["headDim"] = lora + rope
    if "headDim" not in out and out.get("hiddenSize") and out.get("numAttentionHeads"):
        out["headDim"] = out["hiddenSize"] // out["numAttentionHeads"]
    return out


def with_model_config(doc: Any, config: Any) -> Any:
    """`doc` with its model's architecture completed from `config` where the spec names no
    preset and leaves a field unset; anything else is returned unchanged."""
    try:
        model = doc["spec"]["model"]
        arch = model.get("architecture") or {}
    except (KeyError, TypeError, AttributeError):
        return doc
    if not isinstance(arch, dict) or arch.get("preset"):
        return doc
    fields = architecture_fields(config)
    if not fields:
        return doc
    out = copy.deepcopy(doc)
    out["spec"]["model"]["architecture"] = {**fields, **arch}
    return out
