"""Host offload pool: round trips in every layout, LRU by prefix hash, byte bound, busy blocks."""

from __future__ import annotations

import pytest

from ascend_runtime.kv.layout import LAYOUTS, KvLayout, KvSpec, allocate

torch = pytest.importorskip("torch", reason="KV offload tests need the 'kernels' extra")
from ascend_runtime.kv.offload import HostKvPool  # noqa: E402

MHA = KvSpec(num_layers=3, num_blocks=8, block_size=4, heads=2, k_dim=8, v_dim=8)
MLA = KvSpec(num_layers=3, num_blocks=8, block_size=4, heads=1, k_dim=16, v_dim=4)


def device_cache(spec: KvSpec, name: str = "cross_layer"):
    bufs = allocate(KvLayout(spec, name), torch.bfloat16)
    bufs.k.copy_(torch.randn(bufs.k.shape))
    bufs.v.copy_(torch.randn(bufs.v.shape))
    return bufs


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("spec", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("method", ["auto", "dma"])
def test_store_then_load_restores_blocks(name, spec, method):
    dev = device_cache(spec, name)
    pool = HostKvPool(dev, 6 * spec.block_bytes(), method=method)
    original = dev.k.clone(), dev.v.clone()
    t = pool.store(["a", "b", "c"], [5, 1, 6])
    assert t.done() and pool.lookup(["a", "b", "c", "d"]) == 3
    dev.k.zero_()
    dev.v.zero_()
    pool.load(["a", "b", "c"], [0, 2, 3]).wait()
    for src, dst in ((5, 0), (1, 2), (6, 3)):
        assert torch.equal(dev.k[dst], original[0][src]) and torch.equal(
            dev.v[dst], original[1][src]
        )
    assert torch.count_nonzero(dev.k[1]) == 0  # nothing else written
    s = pool.stats
    assert (s.stored_blocks, s.loaded_blocks, s.hits, s.misses) == (3, 3, 3, 1)
    assert s.bytes_to_host == s.bytes_to_device == 3 * spec.block_bytes()


def test_lru_eviction_is_bounded_in_bytes():
    dev = device_cache(MHA)
    pool = HostKvPool(dev, 3 * MHA.block_bytes() + MHA.block_bytes() // 2)
    assert pool.capacity_blocks == 3
    pool.store(["a", "b", "c"], [0, 1, 2])
    assert pool.lookup(["a"]) == 1  # touch: b is now the least recently used
    pool.store(["a", "d"], [0, 3])  # "a" is present: not copied again
    assert pool.stats.stored_blocks == 4 and pool.stats.evicted_blocks == 1
    assert pool.lookup(["b"]) == 0 and pool.lookup(["a", "c", "d"]) == 3
    assert pool.used_bytes == 3 * MHA.block_bytes() <= 3.5 * MHA.block_bytes()
    # the leading-prefix rule: a miss stops the count even if later blocks are present
    assert pool.lookup(["x", "a"]) == 0


class FakeEvent:
    def __init__(self) -> None:
        self.fired = False

    def query(self) -> bool:
        return self.fired

    def wait(self) -> None: ...

    def synchronize(self) -> None:
        self.fired = True


def test_blocks_in_flight_are_neither_visible_nor_evictable(monkeypatch):
    dev = device_cache(MHA)
    pool = HostKvPool(dev, 2 * MHA.block_bytes())
    events: list[FakeEvent] = []

    def slow_copy(*args):
        events.append(FakeEvent())
        return events[-1]

    monkeypatch.setattr(pool.copier, "copy", slow_copy)
    pool.store(["a", "b"], [0, 1])
    assert pool.lookup(["a"]) == 0  # store still running
    with pytest.raises(KeyError, match="its store is running"):
        pool.load(["a"], [2])
    pool.store(["c"], [2])  # no free or evictable block: rejected, nothing overwritten
    assert pool.stats.rejected_blocks == 1
    events[0].fired = True
    assert pool.lookup(["a", "b"]) == 2
    pool.load(["a"], [3])  # a load reads "a" until its event fires
    pool.store(["c"], [2])  # evicts "b" (ready, unread), never "a"
    assert pool.lookup(["a", "c"]) == 1 and pool.stats.evicted_blocks == 1
    pool.drain()
    assert pool.lookup(["a", "c"]) == 2
    pool.store(["e"], [4])  # now "a" is evictable again (LRU among ready, unread blocks)
    assert pool.stats.evicted_blocks == 2


def test_bad_sizes_are_explained():
    dev = device_cache(MHA)
    with pytest.raises(ValueError, match="smaller than one block"):
        HostKvPool(dev, MHA.block_bytes() - 1)
    pool = HostKvPool(dev, 2 * MHA.block_bytes())
    with pytest.raises(ValueError, match="2 hashes for 1 device blocks"):
        pool.store(["a", "b"], [0])
