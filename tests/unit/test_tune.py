"""`ascend-serve tune`: every layout it prints validates, the SLO orders them, bad input is
refused. Sim engine's virtual clock."""

from __future__ import annotations

import io

import pytest
import yaml

from ascend_operator.cli import main
from ascend_operator.planner import plan_manifest
from ascend_operator.tune import Slo, candidates


def _tune(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["tune", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("devices", [16, 48])
def test_printed_layouts_validate(devices):
    code, out, err = _tune(
        "--model", "qwen3-235b-a22b", "--devices", str(devices), "--workload", "random:512:64",
        "--concurrency", "16", "--requests", "16", "--top", "3",
    )  # fmt: skip
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert len(docs) == 3
    for doc in docs:
        plan = plan_manifest({**doc, "metadata": {**doc["metadata"], "namespace": "t"}})
        assert plan.total_devices == devices
    assert out.count("predicted") == 3
    if devices == 48:  # three nodes: PD splits are searched too
        assert "PD: prefill" in err


def test_candidates_cover_unified_and_pd_splits():
    labels = [label for label, _, _ in candidates("qwen3-235b-a22b", 48, "A3", 144)]
    assert "unified TP4 x DP4 x 3" in labels
    assert "PD: prefill 1 x (TP8 x DP2), decode TP4 x DP8" in labels  # vllm-ascend's layout
    assert not any("TP3" in label for label in labels)  # does not divide the heads


def test_slo_orders_layouts():
    assert Slo.parse("ttft=2000,tpot=50") == Slo(2000, 50)
    assert Slo.parse("tpot=50").met({"mean_ttft_ms": 1e9, "mean_tpot_ms": 49})
    assert not Slo.parse("ttft=1").met({"mean_ttft_ms": 2, "mean_tpot_ms": 0})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope", "--devices", "16"], "--model"),
        (["--model", "qwen3-235b-a22b", "--devices", "24"], "--devices"),
        (["--model", "qwen3-235b-a22b", "--devices", "16", "--slo", "ttft=fast"], "--slo"),
        (["--model", "qwen3-235b-a22b", "--devices", "16", "--slo", "latency=5"], "--slo"),
    ],
)
def test_bad_input_is_refused(args, message):
    code, _, err = _tune(*args)
    assert code == 2 and message in err
