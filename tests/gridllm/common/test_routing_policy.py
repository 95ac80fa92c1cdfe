"""gridllm.common.routing_policy: cache-aware scoring, its tie-break, least-load and round-robin."""

from __future__ import annotations

import collections

import pytest

from gridllm.common.routing_policy import (
    CacheAwarePolicy,
    Candidate,
    LeastLoadPolicy,
    RoundRobinPolicy,
    make_policy,
)

BLOCK = 16


def test_cache_aware_follows_the_prefix_while_load_allows():
    policy = CacheAwarePolicy()
    cached = Candidate("a", num_overlap_blocks=60, num_running=4)
    empty = Candidate("b", num_running=2)
    # 1000-token prompt, 960 cached on a: a little more load does not matter.
    assert policy.choose([cached, empty], 1000, BLOCK) == 0
    # Once a's queue holds more work than the cache saves, b wins.
    cached.num_waiting, cached.num_queued_tokens = 20, 2000
    assert policy.choose([cached, empty], 1000, BLOCK) == 1


def test_cache_aware_cost_counts_uncached_tokens_queue_and_requests():
    policy = CacheAwarePolicy(running_weight=4.0)
    candidate = Candidate("a", num_overlap_blocks=2, num_running=3, num_waiting=1,
                          num_queued_tokens=50)
    assert policy.cost(candidate, 100, BLOCK) == (100 - 32) + 50 + 4.0 * 4
    # This router's own in-flight count stands in while the reported load lags.
    candidate.num_inflight = 10
    assert policy.cost(candidate, 100, BLOCK) == (100 - 32) + 50 + 4.0 * 10
    # An overlap beyond the prompt cannot make the prompt cost negative.
    assert policy.cost(Candidate("b", num_overlap_blocks=100), 100, BLOCK) == 0


def test_cache_aware_avoids_a_nearly_full_kv_pool():
    policy = CacheAwarePolicy()
    full = Candidate("a", num_overlap_blocks=30, kv_usage=0.99)
    free = Candidate("b", kv_usage=0.2)
    assert policy.choose([full, free], 500, BLOCK) == 1
    full.kv_usage = 0.5  # below the threshold: the cache wins again
    assert policy.choose([full, free], 500, BLOCK) == 0


def test_cache_aware_spreads_ties_instead_of_herding():
    """Equal candidates (one stale view shared by many picks) are drawn at random, so a
    burst spreads over all of them; a single best candidate is always taken."""
    policy = CacheAwarePolicy(seed=1)
    equal = [Candidate(f"s{i}", num_running=5) for i in range(4)]
    picks = collections.Counter(policy.choose(equal, 200, BLOCK) for _ in range(400))
    assert set(picks) == {0, 1, 2, 3}
    assert min(picks.values()) > 60
    # Within the tolerance (5%) still tied; beyond it, not.
    near = [Candidate("a", num_queued_tokens=0), Candidate("b", num_queued_tokens=5)]
    assert {policy.choose(near, 200, BLOCK) for _ in range(50)} == {0, 1}
    far = [Candidate("a", num_queued_tokens=0), Candidate("b", num_queued_tokens=50)]
    assert {policy.choose(far, 200, BLOCK) for _ in range(50)} == {0}
    # The same seed draws the same sequence.
    first, second = CacheAwarePolicy(seed=7), CacheAwarePolicy(seed=7)
    assert ([first.choose(equal, 200, BLOCK) for _ in range(20)]
            == [second.choose(equal, 200, BLOCK) for _ in range(20)])


def test_least_load_ignores_the_cache_and_rotates_ties():
    policy = LeastLoadPolicy()
    cached = Candidate("a", num_overlap_blocks=60, num_running=3)
    idle = Candidate("b", num_running=1)
    assert policy.choose([cached, idle], 1000, BLOCK) == 1
    equal = [Candidate("a"), Candidate("b"), Candidate("c")]
    assert sorted(policy.choose(equal, 10, BLOCK) for _ in range(3)) == [0, 1, 2]
    # Same request count: fewer queued tokens wins.
    assert policy.choose([Candidate("a", num_waiting=1, num_queued_tokens=900),
                          Candidate("b", num_waiting=1, num_queued_tokens=10)], 10, BLOCK) == 1


def test_round_robin_takes_each_in_turn():
    policy = RoundRobinPolicy()
    candidates = [Candidate("a", num_overlap_blocks=9), Candidate("b", num_running=100),
                  Candidate("c")]
    assert [policy.choose(candidates, 100, BLOCK) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_policies_by_name_and_bad_settings_name_the_field():
    assert [make_policy(n).name for n in ("cache_aware", "least_load", "round_robin")] == [
        "cache_aware", "least_load", "round_robin"]
    with pytest.raises(ValueError, match="routing_policy"):
        make_policy("random")
    with pytest.raises(ValueError, match="running_weight"):
        CacheAwarePolicy(running_weight=-1)
    with pytest.raises(ValueError, match="kv_threshold"):
        CacheAwarePolicy(kv_threshold=1.0)
