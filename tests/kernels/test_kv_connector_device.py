"""The connector's host stage and a prefill->decode hand-off with the engine's caches on the
test device (an NVIDIA GPU when present: pinned stage, side-stream copies; else the CPU under
Triton's interpreter)."""

from __future__ import annotations

import time

import pytest
import torch

from ascend_runtime.kv.connector.caches import HostStage, describe_caches
from ascend_runtime.kv.connector.scheduler import PdScheduler
from ascend_runtime.kv.connector.settings import ConnectorSettings
from ascend_runtime.kv.connector.worker import PdWorker
from procs import free_port

LAYERS, BLOCKS, BS, DIM = 4, 10, 16, 32


def engine_caches(
    device: str, heads: int, seed: int, hnd: bool = False
) -> dict[str, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)

    def cache(dim: int) -> torch.Tensor:
        if hnd:  # stored (blocks, heads, tokens, dim), seen as (blocks, tokens, heads, dim)
            t = torch.randn(BLOCKS, heads, BS, dim, generator=g).to(device, torch.bfloat16)
            return t.transpose(1, 2)
        return torch.randn(BLOCKS, BS, heads, dim, generator=g).to(device, torch.bfloat16)

    return {f"layers.{i}": (cache(DIM), cache(DIM // 2)) for i in range(LAYERS)}


@pytest.mark.parametrize(
    ("layout", "hnd"),
    [("cross_layer", False), ("per_layer", False), ("cross_layer_hnd", True),
     ("per_layer_hnd", True)],
)  # fmt: skip
def test_stage_round_trip_through_every_host_layout(device, layout, hnd):
    kv = engine_caches(device, heads=2, seed=1, hnd=hnd)
    stage = HostStage(describe_caches(kv), layout)
    assert stage.host.k_raw.is_pinned() == (device != "cpu")
    blocks = [7, 2, 3, 9]
    stage.to_host(blocks)
    for i, (k, v) in enumerate(kv.values()):
        hk, hv = stage.host.layer(i)
        assert torch.equal(hk[blocks], k[blocks].cpu()) and torch.equal(hv[blocks], v[blocks].cpu())
        assert not hk[[0, 1]].any()  # only the blocks asked for
    originals = {n: (k.clone(), v.clone()) for n, (k, v) in kv.items()}
    for k, v in kv.values():
        k.zero_()
        v.zero_()
    stage.to_device(blocks)
    for name, (k, v) in kv.items():
        ok, ov = originals[name]
        assert torch.equal(k[blocks], ok[blocks]) and torch.equal(v[blocks], ov[blocks])
        assert not k[[0, 1]].any()


def test_stage_refuses_a_layout_that_reorders_blocks(device):
    with pytest.raises(ValueError, match=r"engine's NHD caches.*use kv_layout cross_layer$"):
        HostStage(describe_caches(engine_caches(device, 2, 0)), "cross_layer_hnd")
    with pytest.raises(ValueError, match=r"HND.*use kv_layout per_layer_hnd"):
        HostStage(describe_caches(engine_caches(device, 2, 0, hnd=True)), "per_layer")


def _settings(role: str, port: int) -> ConnectorSettings:
    return ConnectorSettings(
        role=role, engine_id=f"{role}-0", host="127.0.0.1", kv_port=port, tp=1, kv_heads=2,
        block_size=BS, num_blocks=BLOCKS, timeout=30,
    )  # fmt: skip


def test_hand_off_between_device_caches(device):
    prefill_kv, decode_kv = engine_caches(device, 2, seed=2), engine_caches(device, 2, seed=3)
    p_set, d_set = _settings("prefill", free_port()), _settings("decode", free_port())
    p_sched, d_sched = PdScheduler(p_set), PdScheduler(d_set)
    p_work = PdWorker(p_set, 0, describe_caches(prefill_kv))
    d_work = PdWorker(d_set, 0, describe_caches(decode_kv))
    try:
        tokens, p_blocks, d_blocks = 3 * BS + 5, [8, 1, 4, 6], [0, 5, 2, 9]
        params = {"do_remote_decode": True}
        p_sched.scheduled("r", params, p_blocks, tokens, tokens)
        meta = p_sched.build_meta()
        p_work.start(meta)
        p_work.save(meta)
        keep, out = p_sched.finished("r", params, p_blocks, True, tokens)
        assert keep and out
        d_sched.after_alloc("d", dict(out), d_blocks, tokens, tokens)
        d_work.start(d_sched.build_meta())
        deadline, got = time.monotonic() + 20, set()
        while not got and time.monotonic() < deadline:
            got = d_work.finished(())[1]
            time.sleep(0.01)
        assert got == {"d"} and d_work.load_errors() == set()
        for name, (k, v) in decode_kv.items():
            pk, pv = prefill_kv[name]
            for t in range(tokens):
                src, dst = p_blocks[t // BS], d_blocks[t // BS]
                assert torch.equal(k[dst, t % BS], pk[src, t % BS])
                assert torch.equal(v[dst, t % BS], pv[src, t % BS])
        sent: set[str] = set()
        while not sent and time.monotonic() < deadline:
            sent = p_work.finished({"r"})[0]
            time.sleep(0.01)
        assert sent == {"r"}
    finally:
        p_work.close()
        d_work.close()
