"""router.routing: the policy and the Redis prefix index."""

from __future__ import annotations

import asyncio

import pytest

from gridllm.common import redis_keys
from gridllm.common.prefix_hash import prompt_block_hashes
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.routing_policy import CacheAwarePolicy, Candidate
from router.routing import PrefixIndex, SchedulerPool

BLOCK_SIZE = 4


class _Link:
    def __init__(self, address: str, load: int, worker_ids=()):
        self.address, self.load, self.worker_ids = address, load, list(worker_ids)


def choose(links: list[_Link], overlaps: dict[str, int]) -> _Link:
    # The prompt: the largest overlap plus a block (every overlap is a real prefix of it).
    num_prompt_tokens = (max(overlaps.values(), default=0) + 1) * 16
    candidates = [Candidate(link.address, overlaps.get(link.address, 0), num_running=link.load)
                  for link in links]
    return links[CacheAwarePolicy().choose(candidates, num_prompt_tokens, 16)]


def test_choose_prefers_cache_overlap_when_balanced():
    a, b = _Link("a", 3), _Link("b", 5)
    assert choose([a, b], {"b": 4}) is b
    assert choose([a, b], {}) is a  # no overlap anywhere: least loaded


def test_choose_prefers_balance_when_badly_unbalanced():
    a, b = _Link("a", 100), _Link("b", 2)
    assert choose([a, b], {"a": 10}) is b


def test_prefix_index_counts_leading_run(redis_server):
    import redis.asyncio as aioredis

    async def scenario():
        client = aioredis.from_url(redis_server.rsplit("/", 1)[0] + "/3")
        try:
            await client.flushdb()
            hashes = prompt_block_hashes(list(range(40)), BLOCK_SIZE)
            assert len(hashes) == 9
            # w1 caches the first 5 blocks; w2 the first 2 and (not a prefix) block 4.
            for worker_id, cached in (("w1", hashes[:5]), ("w2", hashes[:2] + hashes[3:4])):
                mapping = {str(h): redis_keys.encode_cached_block(i, 0, (1, 2))
                           for i, h in enumerate(cached)}
                await client.hset(KEYS.kv_cached_key(worker_id), mapping=mapping)
            index = PrefixIndex(client)
            overlap = await index.overlap(["w1", "w2", "w3"], hashes)
            assert overlap == {"w1": 5, "w2": 2, "w3": 0}

            # The pool routes the prompt to the scheduler whose worker holds the longer prefix.
            # A running request weighs one token: the 3-block overlap gap outweighs the
            # 6-request load gap.
            pool = SchedulerPool(["127.0.0.1:1", "127.0.0.1:2"], index,
                                 policy=CacheAwarePolicy(running_weight=1.0))
            try:
                first, second = pool.links
                for link, workers in ((first, ["w2"]), (second, ["w1"])):
                    link.is_alive = True
                    link.worker_ids = workers
                    link.info = _info()
                first.num_inflight, second.num_inflight = 0, 6
                picked = await pool.pick(list(range(40)), timeout_s=1.0)
                assert picked is second
                # A prompt nobody caches goes to the least loaded one.
                picked = await pool.pick([300 + i for i in range(40)], timeout_s=1.0)
                assert picked is first
            finally:
                await pool.close()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_prefix_index_without_redis_is_empty():
    assert asyncio.run(PrefixIndex(None).overlap(["w"], [1, 2])) == {}


def test_pool_times_out_without_schedulers():
    async def scenario():
        pool = SchedulerPool(["127.0.0.1:1"], None)
        try:
            with pytest.raises(TimeoutError):
                await pool.pick([1, 2, 3], timeout_s=0.3)
        finally:
            await pool.close()

    asyncio.run(scenario())


def _info():
    from gridllm.v1 import scheduler_pb2

    return scheduler_pb2.SchedulerInfo(block_size=BLOCK_SIZE, vocab_size=320, max_model_len=64,
                                       num_workers=1)


def test_routing_never_sends_to_a_dead_scheduler():
    """Whatever the policy and however much of the prompt a dead scheduler's workers hold
    (in the index, or in this router's recent routes), only alive schedulers are picked."""
    from gridllm.common.routing_policy import LeastLoadPolicy, RoundRobinPolicy
    from router.kv_index import KvIndex, KvIndexFollower

    prompt = list(range(40))
    hashes = prompt_block_hashes(prompt, BLOCK_SIZE)

    async def scenario(policy):
        follower = KvIndexFollower(None, KvIndex())
        follower.index.replace({"w-dead": set(hashes)}, 1)
        pool = SchedulerPool(["127.0.0.1:1", "127.0.0.1:2"], PrefixIndex(None, follower),
                             policy=policy)
        try:
            dead, alive = pool.links
            for link, workers in ((dead, ["w-dead"]), (alive, ["w-alive"])):
                link.is_alive, link.worker_ids, link.info = True, workers, _info()
            alive.num_inflight = 50  # busy: every policy but round-robin prefers `dead`
            assert (await pool.pick(prompt, timeout_s=1.0)) is dead or policy.name != \
                "cache_aware"
            pool.mark_down(dead)
            return {(await pool.pick(prompt, timeout_s=1.0)).address for _ in range(20)}
        finally:
            await pool.close()

    for policy in (CacheAwarePolicy(), LeastLoadPolicy(), RoundRobinPolicy()):
        assert asyncio.run(scenario(policy)) == {"127.0.0.1:2"}, policy.name


def _stats(num_waiting: int, num_queued_tokens: int):
    from gridllm.v1 import generate_pb2

    return generate_pb2.GetServerStatsResponse(
        num_requests_waiting=num_waiting, workers=[generate_pb2.WorkerStats(
            worker_id="w", kv_blocks_total=100, kv_blocks_free=100, is_alive=True,
            num_requests_waiting=num_waiting, num_queued_tokens=num_queued_tokens)])


def _links():
    from router.routing import SchedulerLink

    links = [SchedulerLink(name, None, None, is_alive=True) for name in ("a", "b")]
    for link in links:
        link.info = _info()
    return links


def test_a_request_ended_since_the_last_poll_leaves_its_prefix_attractive():
    """The last poll caught this router's request waiting at `a`; it has ended since. The
    next prompt sharing its cached prefix goes to `a`, as it would after the next poll:
    the stale snapshot does not count the request any more."""
    from router.kv_index import RecentRoutes
    from router.routing import choose_link, note_load

    a, b = _links()
    prompt = list(range(140))
    a.routed(len(prompt), len(prompt))
    polls_before = a.admit()
    for link, stats in ((a, _stats(1, len(prompt))), (b, _stats(0, 0))):
        note_load(link, stats, link.begin_poll())
    stale = a.candidate(0)
    assert (stale.load, stale.num_queued_tokens) == (1, len(prompt))  # counted while waiting
    a.prefilled()
    a.release(polls_before)
    overlaps = {"a": 128 // BLOCK_SIZE}
    for seed in range(8):  # whichever way ties would break
        picked = choose_link([a, b], overlaps, CacheAwarePolicy(seed=seed), prompt, BLOCK_SIZE,
                             [], RecentRoutes())
        assert picked is a, seed
        picked.prefilled()
    candidate = a.candidate(0)
    assert (candidate.load, candidate.num_queued_tokens, candidate.num_inflight) == (0, 0, 0)
    # The next poll's snapshot stands as reported.
    note_load(a, _stats(1, 7), a.begin_poll())
    assert (a.candidate(0).load, a.candidate(0).num_queued_tokens) == (1, 7)


def test_a_request_sent_after_a_poll_went_out_is_not_taken_off_its_snapshot():
    """Another router's request waits at `a`. This router's own request went out after the
    poll did, so the snapshot does not hold it: its end leaves the other one counted. A
    late reply to an older poll does not replace a newer snapshot."""
    from router.routing import note_load

    a, _ = _links()
    poll = a.begin_poll()
    a.routed(50, 50)
    polls_before = a.admit()
    note_load(a, _stats(1, 30), poll)
    a.prefilled()
    a.release(polls_before)
    candidate = a.candidate(0)
    assert (candidate.load, candidate.num_queued_tokens) == (1, 30)
    older = a.begin_poll()
    newer = a.begin_poll()
    note_load(a, _stats(2, 60), newer)
    note_load(a, _stats(0, 0), older)
    assert (a.candidate(0).load, a.candidate(0).num_queued_tokens) == (2, 60)


def test_a_request_that_ends_while_a_poll_is_under_way_is_taken_off_its_reply():
    """The poll went out while this router's request waited at `a`, and the request ended
    before the reply came back: the reply may count it (here it does), so it is taken off;
    events from before the poll went out are not (its snapshot cannot hold them)."""
    from router.routing import note_load

    a, _ = _links()
    a.routed(40, 40)
    early = a.admit()
    a.prefilled()
    a.release(early)  # ended before the poll: the snapshot below does not count it
    a.routed(60, 60)
    polls_before = a.admit()
    poll = a.begin_poll()
    a.prefilled()
    a.release(polls_before)
    note_load(a, _stats(2, 90), poll)  # itself (60 tokens) and another router's (30)
    candidate = a.candidate(0)
    assert (candidate.load, candidate.num_queued_tokens) == (1, 30)
    note_load(a, _stats(1, 30), a.begin_poll())
    assert (a.candidate(0).load, a.candidate(0).num_queued_tokens) == (1, 30)
    assert a.exits_since_stats == []


def test_a_lone_scheduler_notes_each_request_until_its_first_token():
    """With one scheduler alive there is nothing to choose, but the request is noted as
    routed all the same: its first token then ends its own entry, not that of a request
    routed after a second scheduler came back."""
    async def scenario():
        pool = SchedulerPool(["127.0.0.1:1", "127.0.0.1:2"], None)
        try:
            a, b = pool.links
            a.is_alive, a.info = True, _info()
            assert (await pool.pick(list(range(10)), timeout_s=1.0)) is a
            assert list(a.routed_tokens) == [(10, 10, 0)]
            b.is_alive, b.info, b.num_inflight = True, _info(), 5  # busy: `a` again
            assert (await pool.pick(list(range(30)), timeout_s=1.0)) is a
            a.prefilled()  # the first request's first token
            assert [entry[0] for entry in a.routed_tokens] == [30]
        finally:
            await pool.close()

    asyncio.run(scenario())
