"""Known model architectures (presets) and the merge of a spec's overrides onto them."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..api.spec import ModelArchitecture


@dataclass(frozen=True)
class Architecture:
    """Resolved architecture facts; None means unknown."""

    hidden_size: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    num_experts: int | None = None
    experts_per_token: int | None = None
    total_params_b: float | None = None
    active_params_b: float | None = None
    mla: bool | None = None
    mtp_layers: int | None = None
    rope_theta: float | None = None

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)


PRESETS: dict[str, Architecture] = {
    # From the models' published config.json files.
    "qwen3-235b-a22b": Architecture(
        hidden_size=4096,
        num_layers=94,
        num_attention_heads=64,
        num_kv_heads=4,
        head_dim=128,
        num_experts=128,
        experts_per_token=8,
        total_params_b=235.0,
        active_params_b=22.0,
        mla=False,
        mtp_layers=0,
        rope_theta=1_000_000.0,
    ),
    "qwen3-30b-a3b": Architecture(
        hidden_size=2048,
        num_layers=48,
        num_attention_heads=32,
        num_kv_heads=4,
        head_dim=128,
        num_experts=128,
        experts_per_token=8,
        total_params_b=30.5,
        active_params_b=3.3,
        mla=False,
        mtp_layers=0,
        rope_theta=1_000_000.0,
    ),
    "qwen3-8b": Architecture(
        hidden_size=4096,
        num_layers=36,
        num_attention_heads=32,
        num_kv_heads=8,
        head_dim=128,
        num_experts=0,
        total_params_b=8.2,
        active_params_b=8.2,
        mla=False,
        mtp_layers=0,
        rope_theta=1_000_000.0,
    ),
    "deepseek-v3": Architecture(
        hidden_size=7168,
        num_layers=61,
        num_attention_heads=128,
        num_kv_heads=1,
        head_dim=576,
        num_experts=256,
        experts_per_token=8,
        total_params_b=671.0,
        active_params_b=37.0,
        mla=True,
        mtp_layers=1,
    ),
    # A toy network for sim runs and tests.
    "tiny": Architecture(
        hidden_size=256,
        num_layers=4,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=64,
        num_experts=0,
        total_params_b=0.05,
        active_params_b=0.05,
        mla=False,
        mtp_layers=0,
    ),
}


def resolve_architecture(spec: ModelArchitecture) -> Architecture:
    """The preset (if any) with every field the spec sets laid over it."""
    base = PRESETS.get(spec.preset or "", Architecture())
    overrides = {
        f.name: getattr(spec, f.name)
        for f in fields(Architecture)
        if hasattr(spec, f.name) and getattr(spec, f.name) is not None
    }
    return replace(base, **overrides)
