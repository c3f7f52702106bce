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


def test_requests_in_flight_load_their_instance_until_they_finish():
    """A burst on one cached prefix: the router's own in-flight requests count as decode load
    at once (the engines' KV usage comes a scrape later, and is the same for all of them
    here), so the burst spills once queueing there outweighs recomputing the prefix, and comes
    back once they finish. A retried key leaves its first instance; a leaver takes its own."""
    policy = KvAwarePolicy(mode="precise", decode_weight=0.5)
    policy.index.stored("x", A)
    stale = {"x": 0.0, "y": 0.0}
    picks = []
    for i in range(4):
        picks.append(policy.choose(f"r{i}", A, ["x", "y"], stale).instance)
        policy.prefilled(f"r{i}")  # first tokens back; the answers still streaming
    # 4 blocks cached on x; each request there adds 0.5 x 4 = 2 blocks of decode load
    assert picks == ["x", "x", "x", "y"], picks
    for i in range(4):
        policy.finished(f"r{i}")
    assert policy._active == {}
    assert policy.choose("r9", A, ["x", "y"], stale).instance == "x"
    policy.choose("r9", A, ["y"], stale)  # the retry on y
    assert policy._active == {"y": 4.0}
    policy.forget("y")
    assert policy._active == {} and policy._active_of == {}
    policy.finished("r9")  # a late end of a forgotten placement changes nothing
    assert policy._active == {}


def test_a_fresh_reading_of_kv_usage_replaces_what_the_router_counted_before_it():
    """Between two scrapes the router adds what it places and takes off what finishes; a new
    reading already holds the requests in flight, so they are not counted twice."""
    policy = KvAwarePolicy(mode="precise", decode_weight=1.0)
    policy.index.stored("x", A)
    policy.index.stored("y", A)
    policy.read("x")
    policy.read("y")
    assert policy.choose("r1", A, ["x", "y"], {"x": 0.0, "y": 0.0}).instance == "x"
    policy.prefilled("r1")
    # the stale reading says both are idle; r1's 4 blocks on x tip r2 to y
    assert policy.choose("r2", A, ["x", "y"], {"x": 0.0, "y": 0.0}).instance == "y"
    policy.prefilled("r2")
    # fresh readings: x holds r1 (4 blocks), y holds r2 plus other work (10 blocks)
    policy.read("x")
    policy.read("y")
    assert policy.choose("r3", A, ["x", "y"], {"x": 4.0, "y": 10.0}).instance == "x"
    policy.prefilled("r3")
    # x's reading said 12 with r1 in it; r3 came and both left since: 12 + 8 - 4 - 8 = 8 < 9
    policy.finished("r1")
    policy.finished("r3")
    assert policy.choose("r4", A, ["x", "y"], {"x": 12.0, "y": 9.0}).instance == "x"
    policy.finished("r4")
    policy.choose("r5", A, ["x", "y"], {"x": 12.0, "y": 9.0})
    policy.prefilled("r5")  # r5 on x, still running: 12 + 4 - 4 = 12 > 9
    assert policy.choose("r6", A, ["x", "y"], {"x": 12.0, "y": 9.0}).instance == "y"
