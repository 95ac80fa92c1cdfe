"""router.kv_index: the event-fed prefix index, its reloads, and the recent-routes overlay."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from gridllm.common import kv_events
from gridllm.common.contract import SchedulerOutput
from gridllm.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from gridllm.common.prefix_hash import prompt_block_hashes
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.sampling_params import SamplingParams
from router.kv_index import KvIndex, KvIndexFollower, RecentRoutes
from router.routing import PrefixIndex
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.redis_mirror import RedisMirror
from scheduler_svc.request import Request

BLOCK_SIZE = 4
STATS = {"num_running": 0, "num_waiting": 0}


def test_overlap_counts_the_leading_run_per_worker():
    hashes = prompt_block_hashes(list(range(40)), BLOCK_SIZE)
    index = KvIndex()
    index.apply(KvEvent("w1", BlockStored(hashes[:5], None, [], BLOCK_SIZE), sequence_number=1))
    index.apply(KvEvent("w2", BlockStored(hashes[:2] + hashes[3:4], None, [], BLOCK_SIZE),
                        sequence_number=2))
    assert index.overlap(["w1", "w2", "w3"], hashes) == {"w1": 5, "w2": 2, "w3": 0}
    index.apply(KvEvent("w1", BlockRemoved([hashes[1]]), sequence_number=3))
    assert index.overlap(["w1", "w2"], hashes) == {"w1": 1, "w2": 2}
    index.apply(KvEvent("w2", AllBlocksCleared(), sequence_number=4))
    assert index.overlap(["w1", "w2"], hashes) == {"w1": 1, "w2": 0}
    assert index.last_sequence == 4
    # Applying an event twice changes nothing (set operations).
    index.apply(KvEvent("w1", BlockRemoved([hashes[1]]), sequence_number=5))
    assert index.overlap(["w1"], hashes) == {"w1": 1}


def _serve(bm: BlockManager, req_id: str, prompt: list[int]) -> None:
    request = Request(req_id, prompt, SamplingParams(temperature=0.0))
    blocks, num_computed = bm.get_computed_blocks(request)
    request.num_computed_tokens = num_computed
    assert bm.allocate_slots(request, request.num_tokens - num_computed, blocks) is not None
    bm.free(request)


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_follower_loads_the_mirror_follows_the_log_and_reloads_after_gaps(redis_server):
    """Blocks cached before the router started come from the mirror, later ones from the
    events; a log trimmed past the follower, or restarted, makes it reload (never stall on
    a stale position)."""
    async def main():
        client = aioredis.from_url(redis_server.rsplit("/", 1)[0] + "/6")
        await client.flushdb()
        bm = BlockManager(64, BLOCK_SIZE)
        mirror = RedisMirror(client, "sched-f", kv_events_max_len=100_000)
        mirror.track("w-f", bm, [0] * 64, lambda: STATS)
        _serve(bm, "before", list(range(100, 109)))
        mirror.note_step("w-f", SchedulerOutput(), [])
        await mirror.flush()
        follower = KvIndexFollower(client)
        follower.start()
        try:
            await _until(lambda: follower.index.has_state)
            assert follower.index.blocks_of("w-f") == set(bm.cached_blocks)
            _serve(bm, "after", list(range(200, 213)))
            mirror.note_step("w-f", SchedulerOutput(), [])
            await mirror.flush()
            await _until(lambda: follower.index.blocks_of("w-f") == set(bm.cached_blocks))
            assert follower.num_bootstraps == 1
            # Trimmed past the follower: events it never saw are gone.
            await follower.close()
            _serve(bm, "missed", list(range(300, 305)))
            mirror.note_step("w-f", SchedulerOutput(), [])
            await mirror.flush()
            _serve(bm, "later", list(range(400, 405)))
            mirror.note_step("w-f", SchedulerOutput(), [])
            await mirror.flush()
            await client.xtrim(KEYS.kv_events_stream, maxlen=1, approximate=False)
            follower.start()
            await _until(lambda: follower.num_bootstraps == 2)
            await _until(lambda: follower.index.blocks_of("w-f") == set(bm.cached_blocks))
            # The log restarts (Redis lost it): below the follower's position.
            await client.delete(KEYS.kv_events_stream, KEYS.kv_events_seq)
            _serve(bm, "reset", list(range(500, 505)))
            mirror.note_step("w-f", SchedulerOutput(), [])
            await mirror.flush()
            await _until(lambda: follower.num_bootstraps == 3)
            await _until(lambda: follower.index.blocks_of("w-f") == set(bm.cached_blocks))
        finally:
            await follower.close()
            await client.aclose()

    asyncio.run(main())


def test_prefix_index_answers_from_the_last_state_while_redis_is_down(redis_server):
    """The event-fed index keeps answering after Redis goes away; without one, the
    fallback reads nothing and routing goes by load."""
    hashes = prompt_block_hashes(list(range(20)), BLOCK_SIZE)

    async def main():
        dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        follower = KvIndexFollower(dead)
        follower.index.replace({"w": set(hashes[:3])}, 7)
        with_index = await PrefixIndex(dead, follower).overlap(["w"], hashes)
        without = await PrefixIndex(dead).overlap(["w"], hashes)
        await dead.aclose()
        return with_index, without

    with_index, without = asyncio.run(main())
    assert with_index == {"w": 3}
    assert without == {}


def test_recent_routes_cover_a_burst_until_they_expire():
    routes = RecentRoutes(ttl_s=0.2)
    hashes = [11, 12, 13, 14]
    routes.note("s1", hashes[:3])
    assert routes.overlap(hashes) == ("s1", 3)
    routes.note("s2", hashes[:1])  # a later route of the first block elsewhere
    assert routes.overlap(hashes) == ("s2", 1)
    assert routes.overlap([99]) == (None, 0)
    time.sleep(0.25)
    assert routes.overlap(hashes) == (None, 0)
    bounded = RecentRoutes(max_entries=2)
    bounded.note("s", [1, 2, 3])
    assert bounded.overlap([1]) == (None, 0) and bounded.overlap([2, 3]) == ("s", 2)


def test_event_log_entries_decode_in_the_follower_format(redis_server):
    """A log entry written by hand (as an external publisher would) is read back."""
    async def main():
        client = aioredis.from_url(redis_server.rsplit("/", 1)[0] + "/6")
        await client.flushdb()
        event = KvEvent("w-x", BlockStored([1, 2], None, list(range(8)), 4), "s", 1.0)
        await client.xadd(KEYS.kv_events_stream, {"e": kv_events.encode(event)},
                          id=kv_events.entry_id(1))
        follower = KvIndexFollower(client)
        await follower.bootstrap()  # positioned at the end: 1
        await client.xadd(KEYS.kv_events_stream, {"e": kv_events.encode(event).replace(
            "w-x", "w-y")}, id=kv_events.entry_id(2))
        applied = await follower.follow_once()
        await client.aclose()
        return applied, follower.index

    applied, index = asyncio.run(main())
    assert applied == 1 and index.blocks_of("w-y") == {1, 2} and index.last_sequence == 2
