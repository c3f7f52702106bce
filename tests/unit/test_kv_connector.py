"""The connector's engine-independent parts: settings, the scheduler's per-step bookkeeping, and
workers of a prefill and a decode instance moving real KV over TCP, with the faults."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from ascend_runtime.kv.connector.caches import describe_caches, describe_pages
from ascend_runtime.kv.connector.scheduler import PdMeta, PdScheduler
from ascend_runtime.kv.connector.settings import (
    ConnectorSettings,
    from_extra_config,
    from_vllm_config,
    staging_layout,
)
from ascend_runtime.kv.connector.worker import PdWorker
from procs import free_port

LAYERS, BLOCKS, BS, DIM = 3, 12, 4, 8


def settings(role: str, tp: int, port: int, **kw) -> ConnectorSettings:
    base = {"engine_id": f"{role}-0", "host": "127.0.0.1", "kv_port": port, "tp": tp,
            "kv_heads": 2, "block_size": BS, "num_blocks": BLOCKS, "timeout": 30.0}  # fmt: skip
    return ConnectorSettings(role=role, **(base | kw))  # type: ignore[arg-type]


def value(t: int, head: int, layer: int, which: int) -> torch.Tensor:
    return torch.arange(DIM, dtype=torch.float32) + 1000 * t + 100 * head + 10 * layer + which


def caches(heads: int, layers: int = LAYERS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) caches the way vllm-ascend registers them."""
    return {
        f"model.layers.{i}.attn": (
            torch.zeros(BLOCKS, BS, heads, DIM),
            torch.zeros(BLOCKS, BS, heads, DIM // 2),
        )
        for i in range(layers)
    }


def fill(kv, tokens: int, blocks: list[int], heads: list[int]) -> None:
    for layer, (k, v) in enumerate(kv.values()):
        for t in range(tokens):
            for j, h in enumerate(heads):
                k[blocks[t // BS], t % BS, j] = value(t, h, layer, 0)
                v[blocks[t // BS], t % BS, j] = value(t, h, layer, 1)[: DIM // 2]


def check(kv, tokens: int, blocks: list[int], heads: list[int]) -> None:
    for layer, (k, v) in enumerate(kv.values()):
        for t in range(tokens):
            for j, h in enumerate(heads):
                assert torch.equal(k[blocks[t // BS], t % BS, j], value(t, h, layer, 0)), (t, h)
                assert torch.equal(v[blocks[t // BS], t % BS, j], value(t, h, layer, 1)[:4])


# ---------------------------------------------------------------------------- settings


def test_settings_from_extra_config_and_bad_values():
    s = from_extra_config(
        {"kv_layout": "per_layer", "timeout": "15", "checksum": "true", "rank_hosts": ["a", "b"]},
        role="kv_producer", engine_id="p", host="10.0.0.1", kv_port=36000, tp=2, kv_heads=4,
        block_size=128, num_blocks=100,
    )  # fmt: skip
    assert (s.role, s.layout, s.timeout, s.checksum) == ("prefill", "per_layer", 15.0, True)
    assert s.rank_hosts == {0: "a", 1: "b"} and s.rank_port(1) == 36001
    known = {"role": "kv_consumer", "engine_id": "d", "host": "h", "kv_port": 36000, "tp": 4,
             "kv_heads": 4, "block_size": 128, "num_blocks": 10}  # fmt: skip
    bad = [
        ({"kv_layout": "nhd"}, "kv_layout 'nhd' is not one of cross_layer"),
        ({"transport": "rdma"}, "transport 'rdma' is not one of tcp, mooncake"),
        ({"timeout": "soon"}, "extra_config.timeout"),
        ({"checksum": "maybe"}, "expected true or false"),
        ({"rank_hosts": "a,b"}, "rank_hosts must be a list"),
        ({"kv_lyout": "per_layer"}, r"unknown keys \['kv_lyout'\]"),
    ]
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            from_extra_config(extra, **dict(known))
    with pytest.raises(ValueError, match=r"kv_port 65534 leaves no room.*below 65532"):
        from_extra_config({}, **(known | {"kv_port": 65534}))
    with pytest.raises(ValueError, match="not a multiple of the model's 4 KV heads"):
        from_extra_config({}, **(known | {"tp": 6}))
    with pytest.raises(ValueError, match="kv_role must be"):
        from_extra_config({}, **(known | {"role": "kv_maybe"}))


def test_settings_from_a_vllm_config_read_by_attribute():
    cfg = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_role="kv_consumer", engine_id="dec-1", kv_port=36000,
            kv_connector_extra_config={"use_ascend_direct": True, "prefill": {"tp_size": 8}},
        ),
        parallel_config=SimpleNamespace(
            tensor_parallel_size=8, data_parallel_rank=1, decode_context_parallel_size=2,
            cp_kv_cache_interleave_size=128,
        ),
        model_config=SimpleNamespace(get_total_num_kv_heads=lambda: 4, use_mla=False),
        cache_config=SimpleNamespace(block_size=128),
    )  # fmt: skip
    s = from_vllm_config(cfg, num_blocks=500, env={"VLLM_HOST_IP": "10.1.2.3"})
    assert (s.role, s.host, s.tp, s.dcp, s.interleave) == ("decode", "10.1.2.3", 8, 2, 128)
    assert s.side_port == 36008 and s.placement().heads_per_rank == 1
    cfg.kv_transfer_config.kv_port = None
    with pytest.raises(ValueError, match="kv_port is required"):
        from_vllm_config(cfg, 500, env={})


# ---------------------------------------------------------------------------- scheduler


def test_decode_scheduler_loads_once_and_skips_locally_cached_blocks():
    sched = PdScheduler(settings("decode", 1, 36000))
    params = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_host": "h",
              "remote_port": 1, "remote_block_ids": [0, 1, 2]}  # fmt: skip
    assert sched.matched_tokens(None, 10, 0) == (0, False)
    assert sched.matched_tokens({"do_remote_prefill": True}, 10, 0) == (0, False)  # no remote
    assert sched.matched_tokens(params, 10, 4) == (6, True)
    assert sched.matched_tokens(params, 10, 10) == (0, False)
    sched.after_alloc("r", params, [7, 8, 9], 6, 10)
    assert params["do_remote_prefill"] is False  # the second call vLLM makes queues nothing
    sched.after_alloc("r", params, [7, 8, 9], 0, 10)
    meta = sched.build_meta()
    assert len(meta.loads) == 1 and not sched.build_meta()
    load = meta.loads[0]
    assert (load.block_ids, load.num_tokens, load.skip_blocks) == ((7, 8, 9), 10, 1)
    # cancelled while loading: the prefill side is told to free its blocks
    assert sched.finished("r", params, [7, 8, 9], False, 10) == (False, None)
    assert sched.build_meta().aborts[0]["remote_engine_id"] == "p"


def test_prefill_scheduler_saves_completed_prompts_and_hands_off_length_capped_ones():
    sched = PdScheduler(settings("prefill", 2, 36000, rank_hosts={0: "a", 1: "b"}))
    params = {"do_remote_decode": True}
    sched.scheduled("r", params, [3, 4], 8, 4)  # chunked prefill: prompt not complete yet
    assert not sched.build_meta()
    sched.scheduled("r", params, [3, 4], 8, 8)
    sched.scheduled("r", params, [3, 4], 8, 9)  # decode steps after it save nothing again
    assert [s.request_id for s in sched.build_meta().saves] == ["r"]
    keep, out = sched.finished("r", params, [3, 4], True, 8)
    assert keep and out is not None
    assert out["remote_block_ids"] == [3, 4] and out["remote_port"] == 36000
    assert out["remote_hosts"] == {"0": "a", "1": "b"} and out["remote_tp_size"] == 2
    assert out["remote_kv_layout"] == "cross_layer" and out["remote_num_blocks"] == BLOCKS
    # stopped by EOS at its first token: nothing to hand off, the hold is released
    sched.scheduled("s", params, [5], 3, 3)
    sched.build_meta()
    assert sched.finished("s", params, [5], False, 3) == (False, None)
    assert sched.build_meta().releases == ["s"]
    # plain requests are none of the connector's business
    sched.scheduled("x", None, [6], 3, 3)
    assert sched.finished("x", None, [6], True, 3) == (False, None) and not sched.build_meta()


# ---------------------------------------------------------------------------- workers


class Instance:
    """An instance's scheduler and its ranks' workers, over per-layer CPU caches."""

    def __init__(self, role: str, tp: int, **kw):
        self.port = _ports(tp)
        self.settings = settings(role, tp, self.port, **kw)
        self.scheduler = PdScheduler(self.settings)
        heads = self.settings.placement().heads_per_rank
        self.kv = [caches(heads) for _ in range(tp)]
        self.workers = [PdWorker(self.settings, r, describe_caches(self.kv[r])) for r in range(tp)]

    def step(self, meta: PdMeta) -> None:
        for w in self.workers:
            w.start(meta)
            w.save(meta)

    def finished(self, ids=()) -> tuple[set[str], set[str]]:
        sent: set[str] = set()
        got: set[str] = set()
        for w in self.workers:
            s, r = w.finished(ids)
            sent |= s
            got |= r
        return sent, got

    def close(self) -> None:
        for w in self.workers:
            w.close()


def _ports(n: int) -> int:
    for _ in range(50):
        base = free_port()
        if base + n < 65536 and all(_free(base + i) for i in range(1, n)):
            return base
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def wait_for(instance: Instance, ids=(), want: str = "got", timeout: float = 10.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent, got = instance.finished(ids)
        out = got if want == "got" else sent
        if out:
            return out
        time.sleep(0.01)
    raise AssertionError(f"nothing {want} within {timeout} s")


@pytest.fixture
def pd():
    made: list[Instance] = []

    def make(role: str, tp: int, **kw) -> Instance:
        made.append(Instance(role, tp, **kw))
        return made[-1]

    yield make
    for inst in made:
        inst.close()


def hand_off(prefill: Instance, tokens: int, blocks: list[int], rid: str = "r1") -> dict:
    p = prefill.settings.placement()
    for r, kv in enumerate(prefill.kv):
        first = p.first_head(r)
        fill(kv, tokens, blocks, list(range(first, first + p.heads_per_rank)))
    params = {"do_remote_decode": True}
    prefill.scheduler.scheduled(rid, params, blocks, tokens, tokens)
    prefill.step(prefill.scheduler.build_meta())  # stages and holds after the forward pass
    keep, out = prefill.scheduler.finished(rid, params, blocks, True, tokens)
    assert keep and out is not None
    return out


@pytest.mark.parametrize("layout", ["cross_layer", "per_layer"])
def test_prefill_tp2_to_decode_tp1_moves_the_kv_and_frees_the_prefill_blocks(pd, layout):
    prefill = pd("prefill", 2, layout=layout)
    decode = pd("decode", 1, layout=layout)
    params = hand_off(prefill, 10, [5, 2, 9])
    assert prefill.finished({"r1"}) == (set(), set())  # held until the decode side is done
    count, is_async = decode.scheduler.matched_tokens(params, 10, 0)
    assert (count, is_async) == (10, True)
    decode.scheduler.after_alloc("d1", params, [0, 1, 2], count, 10)
    meta = decode.scheduler.build_meta()
    # the decode request id differs from the prefill one: params carry the prefill's
    decode.step(meta)
    assert wait_for(decode) == {"d1"}
    check(decode.kv[0], 10, [0, 1, 2], [0, 1])
    assert decode.workers[0].load_errors() == set()
    assert wait_for(prefill, {"r1"}, want="sent") == {"r1"}
    assert all(w.holds is not None and len(w.holds) == 0 for w in prefill.workers)


def test_sent_is_reported_only_after_vllm_finished_the_request(pd):
    prefill, decode = pd("prefill", 1), pd("decode", 1)
    params = hand_off(prefill, 4, [3])
    decode.scheduler.after_alloc("d", params, [6], 4, 4)
    decode.step(decode.scheduler.build_meta())
    wait_for(decode)
    time.sleep(0.05)
    assert prefill.finished() == (set(), set())  # released, but vLLM has not finished it yet
    assert prefill.finished({"r1"})[0] == {"r1"}
    assert prefill.finished({"r1"})[0] == set()  # reported once


def test_locally_cached_prefix_blocks_are_not_overwritten(pd):
    prefill, decode = pd("prefill", 1), pd("decode", 1)
    params = hand_off(prefill, 9, [1, 2, 3])
    sentinel = torch.full((BS, 2, DIM), -7.0)
    for k, _ in decode.kv[0].values():
        k[4] = sentinel
    decode.scheduler.after_alloc("d", params, [4, 5, 6], 9 - BS, 9)  # first block cached
    decode.step(decode.scheduler.build_meta())
    wait_for(decode)
    for k, _ in decode.kv[0].values():
        assert torch.equal(k[4], sentinel)
    for layer, (k, _) in enumerate(decode.kv[0].values()):
        for t in range(BS, 9):
            assert torch.equal(k[[4, 5, 6][t // BS], t % BS, 1], value(t, 1, layer, 0))


def test_prefill_gone_reports_the_request_with_its_blocks_as_load_errors(pd):
    prefill, decode = pd("prefill", 1), pd("decode", 1)
    params = hand_off(prefill, 6, [0, 1])
    prefill.close()
    decode.scheduler.after_alloc("d", params, [8, 9], 6, 6)
    decode.step(decode.scheduler.build_meta())
    assert wait_for(decode) == {"d"}
    assert decode.workers[0].load_errors() == {8, 9}
    assert decode.workers[0].load_errors() == set()


def test_unclaimed_kv_is_released_at_the_timeout(pd):
    prefill = pd("prefill", 2, timeout=0.3)
    hand_off(prefill, 5, [0, 1], rid="late")
    reported = [w.finished({"late"})[0] for w in prefill.workers]
    deadline = time.monotonic() + 5
    while not all(reported) and time.monotonic() < deadline:  # every rank reports on its own
        time.sleep(0.02)
        reported = [r or w.finished(())[0] for r, w in zip(reported, prefill.workers, strict=True)]
    assert reported == [{"late"}, {"late"}]
    assert [w.holds.stats.expired for w in prefill.workers] == [1, 1]


def test_a_decode_request_cancelled_before_its_load_frees_every_prefill_rank(pd):
    prefill, decode = pd("prefill", 2), pd("decode", 1)
    params = hand_off(prefill, 5, [2, 3], rid="cancelled")
    decode.scheduler.matched_tokens(params, 5, 0)
    assert decode.scheduler.finished("d", params, [], False, 5) == (False, None)
    meta = decode.scheduler.build_meta()
    assert len(meta.aborts) == 1
    decode.step(meta)
    deadline = time.monotonic() + 5
    while any(len(w.holds) for w in prefill.workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [w.holds.stats.aborted for w in prefill.workers] == [1, 1]  # not the 30 s timeout
    assert prefill.finished({"cancelled"})[0] == {"cancelled"}


def test_worker_rejects_caches_that_do_not_match_the_settings():
    s = settings("decode", 2, 36000)
    with pytest.raises(ValueError, match="caches 2 KV heads but TP 2 over 2 heads gives 1"):
        PdWorker(s, 0, describe_caches(caches(heads=2)))
    with pytest.raises(ValueError, match="registered 12 KV blocks but the scheduler plans"):
        PdWorker(settings("decode", 1, 36000, num_blocks=99), 0, describe_caches(caches(2)))
    with pytest.raises(ValueError, match="needs uniform layers"):
        describe_caches({"a": torch.zeros(4, 4, 1, 8), "b": torch.zeros(4, 4, 1, 16)})
    mla = describe_caches({"l0": torch.zeros(4, 4, 1, 8), "l1": torch.zeros(4, 4, 1, 8)})
    assert (mla.spec.k_dim, mla.spec.v_dim, mla.v) == (8, 0, [])
    fa = describe_caches({"l0": torch.zeros(2, 4, 4, 2, 8)})  # (2, blocks, ...) CUDA layout
    assert (fa.spec.num_blocks, fa.spec.heads, fa.spec.v_dim) == (4, 2, 8)


# ---------------------------------------------------------------------------- vLLM 0.3x pages


def pages(heads: int, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """Per-layer (blocks, heads, tokens, content) views of one LBHNC buffer, as vLLM 0.32 hands
    them over; content packs a head's keys, then its values, as its CPU backend does."""
    raw = torch.zeros(layers, BLOCKS, heads, BS, 2 * DIM)
    return {f"model.layers.{i}.attn": raw[i] for i in range(layers)}


def slab(block: int, head: int, layer: int) -> torch.Tensor:
    """A whole (tokens, content) page of one head, every row distinct."""
    return torch.arange(BS * 2 * DIM, dtype=torch.float32).view(BS, 2 * DIM) + (
        100_000 * block + 10_000 * head + 1000 * layer
    )


def test_packed_pages_move_whole_blocks_between_tp2_and_tp1(pd):
    """Token rows of a packed page are not tokens: a 5-token prompt over 4-token blocks must
    still bring the whole second block, or the decode side reads half-written values."""
    port = _ports(2)
    prefill_settings = settings("prefill", 2, port, layout=staging_layout("per_layer", "LBHNC"))
    prefill_pages = [pages(1) for _ in range(2)]
    prefill = [
        PdWorker(prefill_settings, r, describe_pages(prefill_pages[r], "LBHNC")) for r in range(2)
    ]
    decode_layout = staging_layout("cross_layer", "LBHNC")
    decode_settings = settings("decode", 1, _ports(1), layout=decode_layout)
    decode_pages = pages(2)
    decode = PdWorker(decode_settings, 0, describe_pages(decode_pages, "LBHNC"))
    try:
        src_blocks, dst_blocks, tokens = [7, 3], [0, 5], 5
        for r, kv in enumerate(prefill_pages):
            for layer, page in enumerate(kv.values()):
                for b in src_blocks:
                    page[b, 0] = slab(b, r, layer)
        sched = PdScheduler(prefill_settings)
        params = {"do_remote_decode": True}
        sched.scheduled("r1", params, src_blocks, tokens, tokens)
        meta = sched.build_meta()
        for w in prefill:
            w.start(meta)
            w.save(meta)
        _, out = sched.finished("r1", params, src_blocks, True, tokens)
        dsched = PdScheduler(decode_settings)
        dsched.after_alloc("d1", out, dst_blocks, tokens, tokens)
        decode.start(dsched.build_meta())
        deadline = time.monotonic() + 10
        while not decode.finished(())[1]:
            assert time.monotonic() < deadline, "the load did not finish"
            time.sleep(0.01)
        assert decode.load_errors() == set()
        for layer, page in enumerate(decode_pages.values()):
            for src, dst in zip(src_blocks, dst_blocks, strict=True):
                for head in range(2):
                    assert torch.equal(page[dst, head], slab(src, head, layer)), (layer, dst, head)
    finally:
        for w in [*prefill, decode]:
            w.close()


def test_page_views_are_described_from_vllms_layout():
    described = describe_pages(pages(2), "LBHNC")
    assert described.packed and described.v == []
    assert (described.spec.heads, described.spec.block_size, described.spec.k_dim) == (2, BS, 16)
    assert described.heads_outside_tokens
    assert staging_layout("cross_layer", "LBHNC") == "cross_layer_hnd"
    assert staging_layout("per_layer_hnd", "LBNHC") == "per_layer"
    with pytest.raises(ValueError, match="unknown vLLM KV cache layout 'XYZ'"):
        describe_pages(pages(2), "XYZ")
    with pytest.raises(ValueError, match=r"one \(blocks, heads, tokens, content\) view"):
        describe_pages({"l0": (torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 2, 2))}, "LBHNC")
    vllm = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_role="kv_producer", engine_id="p-0", kv_port=36000,
            kv_connector_extra_config={"kv_layout": "cross_layer"},
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        model_config=SimpleNamespace(use_mla=False, get_total_num_kv_heads=lambda: 2),
        cache_config=SimpleNamespace(block_size=BS, kv_cache_layout="LBHNC"),
    )  # fmt: skip
    assert from_vllm_config(vllm, BLOCKS, env={}).layout == "cross_layer_hnd"
