"""Architecture facts from a local model's config.json, read by the CLI where no preset is
named (the head and memory checks then know the model)."""

from __future__ import annotations

import io
import json

import yaml

from ascend_operator.cli import main
from ascend_operator.planner.hf_config import architecture_fields, with_model_config
from helpers import manifest


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), out, err), out.getvalue(), err.getvalue()


QWEN3_235B = {  # the published config.json's numbers
    "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
}  # fmt: skip


def test_fields_map_and_odd_values_are_left_out():
    fields = architecture_fields({**QWEN3_235B, "num_hidden_layers": True, "head_dim": "128"})
    assert fields == {
        "hiddenSize": 4096, "numAttentionHeads": 64, "numKvHeads": 4, "numExperts": 128,
        "expertsPerToken": 8, "headDim": 64,  # hidden / heads when head_dim is unusable
    }  # fmt: skip
    mla = architecture_fields(
        {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "n_routed_experts": 256}
    )
    assert mla == {"numExperts": 256, "mla": True, "headDim": 576}
    assert architecture_fields(["not", "a", "mapping"]) == {}


def test_spec_fields_and_presets_win():
    doc = manifest(model={"architecture": {"preset": None, "numKvHeads": 8}})
    arch = with_model_config(doc, QWEN3_235B)["spec"]["model"]["architecture"]
    assert arch["numKvHeads"] == 8 and arch["numAttentionHeads"] == 64
    assert with_model_config(manifest(), QWEN3_235B) == manifest()  # preset named: untouched
    assert with_model_config({"spec": "junk"}, QWEN3_235B) == {"spec": "junk"}


def test_cli_reads_a_hostpath_models_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_235B))
    doc = manifest(
        model={"source": {"pvc": None, "hostPath": {"path": str(tmp_path)}},
               "architecture": {"preset": None}},
        roles=[{"name": "unified", "parallelism": {"tensor": 3}}],
    )  # fmt: skip
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, _, err = run("validate", "-f", str(path))
    assert code == 1 and "64 attention heads" in err
    (tmp_path / "config.json").write_text("{ not json")
    code, out, _ = run("validate", "-f", str(path))  # unreadable config: no facts, no crash
    assert code == 0 and "is valid" in out
