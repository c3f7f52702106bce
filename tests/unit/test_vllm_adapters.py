"""The vLLM adapters driven the way vLLM's scheduler and model runner call them, against
stand-ins of vLLM's 0.2x interfaces (tests/standins, see its README): the line vllm-ascend v0.23
runs, which no CPU build installs. The adapters and everything under them are the production
code; the KV moves over real TCP between two simulated engines. vLLM 0.32 itself runs these
adapters in tests/realvllm."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from procs import free_port

STANDINS = Path(__file__).resolve().parents[1] / "standins"
LAYERS, BLOCKS, BS, HEADS, DIM = 2, 8, 4, 2, 8


@pytest.fixture(scope="module")
def vllm_api():
    added = importlib.util.find_spec("vllm") is None
    if added:
        sys.path.insert(0, str(STANDINS))
    connector = importlib.import_module("ascend_runtime.kv.vllm_connector")
    offload = importlib.import_module("ascend_runtime.kv.vllm_offload")
    base = importlib.import_module("vllm.distributed.kv_transfer.kv_connector.v1.base")
    yield SimpleNamespace(connector=connector, offload=offload, base=base)
    if added:
        sys.path.remove(str(STANDINS))
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]
        for name in ("vllm_connector", "vllm_offload", "vllm_offload_023"):
            sys.modules.pop(f"ascend_runtime.kv.{name}", None)


def vllm_config(role: str, port: int, extra: dict | None = None, connector="AscendKvConnector"):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector=connector, kv_role=role, kv_port=port, engine_id=f"{role}-engine",
            kv_connector_extra_config=extra or {},
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, world_size=1),
        model_config=SimpleNamespace(get_total_num_kv_heads=lambda: HEADS, use_mla=False),
        cache_config=SimpleNamespace(block_size=BS),
    )  # fmt: skip


def kv_cache_config():
    spec = SimpleNamespace(block_size=BS, page_size_bytes=BS * HEADS * DIM * 2 * 4)
    group = SimpleNamespace(kv_cache_spec=spec, layer_names=[f"l{i}" for i in range(LAYERS)])
    return SimpleNamespace(num_blocks=BLOCKS, kv_cache_groups=[group])


def request(rid: str, prompt: int, params: dict | None):
    return SimpleNamespace(
        request_id=rid, kv_transfer_params=params, num_prompt_tokens=prompt,
        num_computed_tokens=0, status=SimpleNamespace(name="RUNNING"),
    )  # fmt: skip


def blocks_of(ids: list[int]):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def output(new: list[tuple[str, list[int], int]] = ()):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,)) for r, b, _ in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[]),
        num_scheduled_tokens={r: n for r, _, n in new},
    )


def engine_step(worker, meta, forward=None):
    """What vLLM's model runner does around one forward pass."""
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    if forward:
        forward()
    worker.wait_for_save()
    worker.clear_connector_metadata()


def test_connector_hands_a_prompt_from_a_prefill_engine_to_a_decode_engine(vllm_api):
    mod, role = vllm_api.connector, vllm_api.base.KVConnectorRole
    p_port, d_port = free_port(), free_port()
    p_cfg, d_cfg = vllm_config("kv_producer", p_port), vllm_config("kv_consumer", d_port)
    p_sched = mod.AscendKvConnector(p_cfg, role.SCHEDULER, kv_cache_config())
    p_work = mod.AscendKvConnector(p_cfg, role.WORKER, kv_cache_config())
    d_sched = mod.AscendKvConnector(d_cfg, role.SCHEDULER, kv_cache_config())
    d_work = mod.AscendKvConnector(d_cfg, role.WORKER, kv_cache_config())
    assert d_work.prefer_cross_layer_blocks
    try:
        # prefill: per-layer (K, V) caches; decode: vLLM's cross-layer registration
        p_kv = {f"l{i}": (torch.zeros(BLOCKS, BS, HEADS, DIM), torch.zeros(BLOCKS, BS, HEADS, DIM))
                for i in range(LAYERS)}  # fmt: skip
        p_work.register_kv_caches(p_kv)
        d_cross = torch.zeros(LAYERS, 2, BLOCKS, BS, HEADS, DIM)
        d_work.register_cross_layers_kv_cache(d_cross, attn_backend=None)

        prompt, p_blocks = 7, [6, 3]
        req = request("p-1", prompt, {"do_remote_decode": True})
        assert p_sched.get_num_new_matched_tokens(req, 0) == (0, False)
        p_sched.update_state_after_alloc(req, blocks_of(p_blocks), 0)
        expected = torch.randn(LAYERS, 2, prompt, HEADS, DIM)

        def forward():
            for i, (k, v) in enumerate(p_kv.values()):
                for t in range(prompt):
                    k[p_blocks[t // BS], t % BS] = expected[i, 0, t]
                    v[p_blocks[t // BS], t % BS] = expected[i, 1, t]

        engine_step(p_work, p_sched.build_connector_meta(output([("p-1", p_blocks, prompt)])),
                    forward)  # fmt: skip
        req.status.name = "FINISHED_LENGTH_CAPPED"
        delay, params = p_sched.request_finished(req, (p_blocks,))
        assert delay and params["remote_block_ids"] == p_blocks
        assert params["remote_port"] == p_port and params["do_remote_prefill"]

        d_req = request("d-1", prompt, dict(params))
        count, is_async = d_sched.get_num_new_matched_tokens(d_req, 0)
        assert (count, is_async) == (prompt, True)
        d_sched.update_state_after_alloc(d_req, blocks_of([1, 5]), count)
        engine_step(d_work, d_sched.build_connector_meta(output()))
        received = set()
        deadline = time.monotonic() + 10
        while "d-1" not in received and time.monotonic() < deadline:
            received |= d_work.get_finished(set())[1] or set()
            time.sleep(0.01)
        assert received == {"d-1"} and d_work.get_block_ids_with_load_errors() == set()
        d_sched.update_connector_output(SimpleNamespace(finished_recving={"d-1"}))
        for t in range(prompt):
            block, off = [1, 5][t // BS], t % BS
            assert torch.equal(d_cross[:, :, block, off], expected[:, :, t])

        sent: set[str] = set()
        while "p-1" not in sent and time.monotonic() < deadline:
            sent |= p_work.get_finished({"p-1"})[0] or set()
            time.sleep(0.01)
        assert sent == {"p-1"}  # vLLM may now free the prefill blocks
    finally:
        p_work.shutdown()
        d_work.shutdown()


def test_connector_config_errors_name_the_field(vllm_api):
    mod, role = vllm_api.connector, vllm_api.base.KVConnectorRole
    bad = vllm_config("kv_producer", 36000, {"kv_layout": "blocks_last"})
    with pytest.raises(ValueError, match="kv_layout 'blocks_last' is not one of"):
        mod.AscendKvConnector(bad, role.SCHEDULER, kv_cache_config())
    with pytest.raises(ValueError, match="kv_transfer_config must be set"):
        mod.AscendKvConnector(SimpleNamespace(kv_transfer_config=None), role.SCHEDULER, None)


@pytest.mark.parametrize("canonical", [False, True])
def test_offloading_spec_of_the_023_line_stores_evicts_and_loads_blocks(vllm_api, canonical):
    mod = vllm_api.offload
    extra = {"num_cpu_blocks": 3, "kv_layout": "cross_layer"}
    spec = mod.AscendOffloadingSpec(vllm_config("kv_both", 1, extra), kv_cache_config())
    manager = spec.get_manager()
    kv = {f"l{i}": (torch.randn(BLOCKS, BS, HEADS, DIM), torch.randn(BLOCKS, BS, HEADS, DIM))
          for i in range(LAYERS)}  # fmt: skip
    if canonical:  # newer vLLM: opaque (blocks, page) tensors
        tensors = [SimpleNamespace(tensor=t.view(BLOCKS, -1)) for pair in kv.values() for t in pair]
        caches = SimpleNamespace(tensors=tensors)
    else:
        caches = kv
    handlers = {(s.medium(), d.medium()): h for s, d, h in spec.get_handlers(caches)}
    store, load = handlers[("GPU", "CPU")], handlers[("CPU", "GPU")]
    gpu = importlib.import_module("vllm.v1.kv_offload.mediums").GPULoadStoreSpec

    out = manager.prepare_store(["a", "b"])
    assert out.block_hashes_to_store == ["a", "b"] and manager.lookup(["a"]) == 0  # not yet
    assert store.transfer_async(1, (gpu([2, 5]), out.store_spec))
    assert [r.job_id for r in store.get_finished()] == [1]
    manager.complete_store(["a", "b"])
    assert manager.lookup(["a", "b", "c"]) == 2
    out = manager.prepare_store(["c", "d"])  # one free block: "a", least recently used, goes
    assert out.block_hashes_evicted == ["a"] and out.block_hashes_to_store == ["c", "d"]
    manager.complete_store(["c", "d"], success=False)
    events = list(manager.take_events())
    assert [(e.block_hashes, e.removed) for e in events] == [(["a", "b"], False), (["a"], True)]
    assert manager.lookup(["b"]) == 1 and manager.lookup(["c"]) == 0

    load_spec = manager.prepare_load(["b"])
    assert load.transfer_async(2, (load_spec, gpu([7])))
    load.wait({2})
    manager.complete_load(["b"])
    for k, v in kv.values():
        assert torch.equal(k[7], k[5]) and torch.equal(v[7], v[5])
    with pytest.raises(KeyError, match="not on the host"):
        manager.prepare_load(["a"])


def test_offloading_spec_of_the_023_line_rejects_configs_it_cannot_serve(vllm_api):
    mod = vllm_api.offload
    with pytest.raises(ValueError, match="needs cpu_bytes_per_rank, cpu_bytes_to_use"):
        mod.AscendOffloadingSpec(vllm_config("kv_both", 1, {}), kv_cache_config())
    with pytest.raises(ValueError, match="no host block from cpu_bytes_to_use=100"):
        mod.AscendOffloadingSpec(vllm_config("kv_both", 1, {"cpu_bytes_to_use": 100}),
                                 kv_cache_config())  # fmt: skip
    with pytest.raises(ValueError, match="block_size 8 must equal the engine's block size 4"):
        mod.AscendOffloadingSpec(
            vllm_config("kv_both", 1, {"num_cpu_blocks": 4, "block_size": 8}), kv_cache_config()
        )
    spec = mod.AscendOffloadingSpec(
        vllm_config("kv_both", 1, {"cpu_bytes_to_use": 10 * 2048}), kv_cache_config()
    )
    assert spec.host_blocks == 10 * 2048 // (BS * HEADS * DIM * 2 * 4 * LAYERS)
