"""The kv-aware router's pure parts: the prefix index (per-instance block hashes, bounded), the
cost that weighs uncached blocks against load, and the policy's precise/approximate bookkeeping.
Pure functions; no engine involved."""

from __future__ import annotations

import pytest

from ascend_runtime.kv.block_hash import block_hashes
from ascend_runtime.kv.cache_events import AllBlocksCleared, BlockStored
from ascend_runtime.router.prefix_index import KvAwarePolicy, PrefixIndex, choose

A = block_hashes(list(range(64)), 16)  # 4 blocks
B = block_hashes(list(range(100, 164)), 16)


def test_matches_count_leading_blocks_per_instance():
    index = PrefixIndex()
    index.stored("x", A)
    index.stored("y", A[:2])
    index.stored("z", A[1:])  # holds later blocks without the first: no match at all
    assert index.matches(A, ["x", "y", "z", "w"]) == {"x": 4, "y": 2, "z": 0, "w": 0}
    index.removed("x", [A[2]])
    assert index.matches(A, ["x"]) == {"x": 2}
    index.cleared("y")
    assert index.matches(A, ["y"]) == {"y": 0} and "y" not in index.instances()


def test_the_index_is_bounded_per_instance_least_recently_used_first():
    index = PrefixIndex(capacity=4)
    index.stored("x", A)
    index.touch("x", A[:1])  # the first block is now the most recent
    index.stored("x", B[:2])
    assert index.size("x") == 4
    assert index.matches(A, ["x"]) == {"x": 1}  # blocks 1 and 2 of A were forgotten
    assert index.matches(B, ["x"]) == {"x": 2}
    index.removed("nobody", A)  # unknown instances are ignored


def test_choose_prefers_the_cached_instance_until_its_load_outweighs_the_hit():
    matched = {"x": 4, "y": 0}
    assert choose(5, matched, {"x": 0, "y": 0}).instance == "x"
    assert choose(5, matched, {"x": 0, "y": 0}).reason == "prefix"
    spill = choose(5, matched, {"x": 10, "y": 0})  # x: 1 + 10 > y: 5 + 0
    assert (spill.instance, spill.reason) == ("y", "spill")
    cold = choose(5, {"x": 0, "y": 0}, {"x": 3, "y": 1})
    assert (cold.instance, cold.reason) == ("y", "load")
    assert choose(5, {"x": 0, "y": 0}, {}).instance == "x"  # ties: the first candidate


def test_precise_policy_counts_routed_prompts_until_their_blocks_are_confirmed():
    now = [0.0]
    policy = KvAwarePolicy(mode="precise", decode_weight=0.0, clock=lambda: now[0])
    first = policy.choose("r1", A, ["x", "y"], {})
    other = "y" if first.instance == "x" else "x"
    # The index has no events yet, but r1 is on its way to `first`: r2 follows it.
    second = policy.choose("r2", A, ["x", "y"], {})
    assert second.instance == first.instance and second.matched_blocks == 4
    assert policy.index.size() == 0  # precise: only events fill the index
    policy.prefilled("r1")
    policy.prefilled("r2")
    policy.prefilled("r2")  # twice is harmless
    assert policy._pending_hashes[first.instance] == {}
    assert policy._pending_work[first.instance] == 0
    # First tokens are back, the BlockStored events not yet: the blocks still count there.
    now[0] = 1.9
    assert policy.choose("r3", A, ["x", "y"], {}).instance == first.instance
    policy.prefilled("r3")
    # An event confirms them: from then on the index alone says where they are.
    policy.apply(first.instance, [BlockStored(A, None, [], 4)])
    assert policy._unconfirmed[first.instance] == {}
    policy.apply(first.instance, [AllBlocksCleared()])
    policy.index.stored(other, A)
    assert policy.choose("r4", A, ["x", "y"], {}).instance == other
    policy.prefilled("r4")
    # Unconfirmed blocks stop counting after confirm_seconds (the event was lost).
    policy.apply(other, [AllBlocksCleared()])
    now[0] = 10.0
    policy.choose("r5", A, [first.instance], {})
    policy.prefilled("r5")  # unconfirmed until 12.0
    now[0] = 12.5
    cold = policy.choose("r6", A, [first.instance], {})
    assert cold.matched_blocks == 0 and cold.reason == "load"


def test_approximate_policy_learns_from_its_own_routing_and_forgets_leavers():
    policy = KvAwarePolicy(mode="approximate", decode_weight=0.0)
    first = policy.choose("r1", A, ["x", "y"], {})
    assert policy.index.matches(A, [first.instance]) == {first.instance: 4}
    policy.prefilled("r1")
    assert policy.choose("r2", A, ["x", "y"], {}).instance == first.instance
    policy.forget(first.instance)
    assert policy.index.size(first.instance) == 0 and "r2" not in policy._sent
    assert policy.reasons == {"load": 1, "prefix": 1}


def test_decode_load_spreads_a_hot_prefix():
    policy = KvAwarePolicy(mode="approximate", decode_weight=1.0)
    policy.index.stored("x", A)
    assert policy.choose("r1", A, ["x", "y"], {"x": 100.0, "y": 0.0}).instance == "y"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="approximate or precise"):
        KvAwarePolicy(mode="exact")
