"""KV events published by the Redis mirror to a real Redis, checked against the block
managers that produced them."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis

from gridllm.common import kv_events
from gridllm.common.contract import SchedulerOutput
from gridllm.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from gridllm.common.prefix_hash import ROOT_HASH, hash_block
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.sampling_params import SamplingParams
from router.kv_index import KvIndex
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.redis_mirror import RedisMirror
from scheduler_svc.request import Request

BLOCK_SIZE = 4
STATS = {"num_running": 0, "num_waiting": 0}


def _db(redis_server: str) -> str:
    return redis_server.rsplit("/", 1)[0] + "/5"


async def _fresh_client(redis_server: str):
    client = aioredis.from_url(_db(redis_server))
    await client.flushdb()
    return client


def _serve(bm: BlockManager, req_id: str, prompt: list[int], keep: bool = False) -> Request:
    """Schedule a prompt whole (hitting the cache), then free it unless ``keep``."""
    request = Request(req_id, prompt, SamplingParams(temperature=0.0))
    blocks, num_computed = bm.get_computed_blocks(request)
    request.num_computed_tokens = num_computed
    assert bm.allocate_slots(request, request.num_tokens - num_computed, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    if not keep:
        bm.free(request)
    return request


async def _log(client, start: str = "-") -> list[kv_events.KvEvent]:
    entries = await client.xrange(KEYS.kv_events_stream, min=start)
    return [kv_events.decode(fields[b"e"], kv_events.sequence_of(raw_id))
            for raw_id, fields in entries]


def _check_chain(event: kv_events.KvEvent) -> None:
    """A stored chain is self-verifying: each hash is the block hash of its parent and
    tokens (no cache salt in these tests)."""
    data = event.data
    parent = ROOT_HASH if data.parent_block_hash is None else data.parent_block_hash
    for i, block_hash in enumerate(data.block_hashes):
        tokens = data.token_ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
        assert hash_block(parent, tokens, None) == block_hash
        parent = block_hash


def test_events_arrive_in_order_and_rebuild_every_cache(redis_server):
    """Two schedulers publish concurrently; the log's sequence numbers are dense and
    increasing, and applying it in order gives, after every flush, exactly what each
    block manager caches (eviction under a small pool included)."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(2, 300) for _ in range(8)] for _ in range(4)]

    async def main():
        client = await _fresh_client(redis_server)
        managers = {"w-a": BlockManager(12, BLOCK_SIZE), "w-b": BlockManager(12, BLOCK_SIZE)}
        mirrors = [RedisMirror(client, "sched-a"), RedisMirror(client, "sched-b")]
        for mirror, (worker_id, bm) in zip(mirrors, managers.items(), strict=True):
            mirror.track(worker_id, bm, [0] * bm.num_blocks, lambda: STATS)
        index, mismatches = KvIndex(), []
        for step in range(30):
            for mirror, (worker_id, bm) in zip(mirrors, managers.items(), strict=True):
                prompt = rng.choice(prefixes) + [rng.randrange(2, 300) for _ in range(5)]
                _serve(bm, f"{worker_id}-{step}", prompt)
                mirror.note_step(worker_id, SchedulerOutput(), [])
            await asyncio.gather(*(m.flush() for m in mirrors))
            for event in await _log(client, kv_events.entry_id(index.last_sequence + 1)):
                index.apply(event)
            for worker_id, bm in managers.items():
                if index.blocks_of(worker_id) != set(bm.cached_blocks):
                    mismatches.append((step, worker_id))
        log = await _log(client)
        await client.aclose()
        return log, mismatches, managers

    log, mismatches, managers = asyncio.run(main())
    assert not mismatches
    assert [e.sequence_number for e in log] == list(range(1, len(log) + 1))
    assert {e.scheduler_id for e in log} == {"sched-a", "sched-b"}
    # Each worker's first events: cleared (newly tracked), then its stores.
    for worker_id in managers:
        own = [e for e in log if e.worker_id == worker_id]
        assert isinstance(own[0].data, AllBlocksCleared)
    stored = [e for e in log if isinstance(e.data, BlockStored)]
    assert any(len(e.data.block_hashes) > 1 for e in stored), "no chain was grouped"
    for event in stored:
        _check_chain(event)
        assert event.data.block_size == BLOCK_SIZE
    # The small pools evicted: removals were published.
    assert any(isinstance(e.data, BlockRemoved) for e in log)


def test_replay_from_a_sequence_number_gives_the_rest_of_the_log(redis_server):
    async def main():
        client = await _fresh_client(redis_server)
        bm = BlockManager(64, BLOCK_SIZE)
        mirror = RedisMirror(client, "sched-r")
        mirror.track("w-r", bm, [0] * 64, lambda: STATS)
        for i in range(10):
            _serve(bm, f"r{i}", [10 + i] * 9)
            mirror.note_step("w-r", SchedulerOutput(), [])
            await mirror.flush()
        full = await _log(client)
        replays = {k: await _log(client, kv_events.entry_id(k)) for k in (1, 4, len(full))}
        await client.aclose()
        return full, replays

    full, replays = asyncio.run(main())
    assert len(full) == 11  # cleared, then one chain per prompt
    for start, events in replays.items():
        assert events == full[start - 1:]


def test_scheduler_restart_clears_then_republishes_the_restored_cache(redis_server):
    """A new scheduler takes over a worker whose cache the mirror holds: its first events
    clear the worker and store exactly the restored blocks, parents included; a lost
    worker link ends with AllBlocksCleared."""
    async def main():
        client = await _fresh_client(redis_server)
        old = BlockManager(32, BLOCK_SIZE)
        versions = [0] * 32
        first = RedisMirror(client, "sched-old")
        await first.restore("w-x", "inst-1", old, versions)
        first.track("w-x", old, versions, lambda: STATS)
        _serve(old, "a", list(range(100, 113)))
        _serve(old, "b", list(range(200, 209)))
        first.note_step("w-x", SchedulerOutput(), [])
        await first.flush()
        num_before = len(await _log(client))
        # The old scheduler dies (no close); a new one restores the worker's cache.
        fresh = BlockManager(32, BLOCK_SIZE)
        second = RedisMirror(client, "sched-new")
        restored = await second.restore("w-x", "inst-1", fresh, versions)
        second.track("w-x", fresh, versions, lambda: STATS)
        await second.flush()
        after_restart = (await _log(client))[num_before:]
        second.untrack("w-x")
        await second.flush()
        at_end = (await _log(client))[-1]
        await client.aclose()
        return old, fresh, restored, after_restart, at_end

    old, fresh, restored, after_restart, at_end = asyncio.run(main())
    assert restored == len(old.cached_blocks) == 5
    assert isinstance(after_restart[0].data, AllBlocksCleared)
    assert all(e.scheduler_id == "sched-new" for e in after_restart)
    republished = [h for e in after_restart[1:] for h in e.data.block_hashes]
    assert sorted(republished) == sorted(fresh.cached_blocks)
    for event in after_restart[1:]:
        _check_chain(event)  # the parents survived the restart through the mirror
    index = KvIndex()
    for event in after_restart:
        index.apply(event)
    assert index.blocks_of("w-x") == set(old.cached_blocks)
    assert at_end.worker_id == "w-x" and isinstance(at_end.data, AllBlocksCleared)


def test_the_log_is_bounded_and_survives_a_lost_counter(redis_server):
    async def main():
        client = await _fresh_client(redis_server)
        bm = BlockManager(1024, BLOCK_SIZE)
        mirror = RedisMirror(client, "sched-b", kv_events_max_len=100)
        mirror.track("w-b", bm, [0] * 1024, lambda: STATS)
        for i in range(600):
            _serve(bm, f"r{i}", [i % 250 + 2, i // 250 + 2] * 2 + [1])
            mirror.note_step("w-b", SchedulerOutput(), [])
            await mirror.flush()
        length = await client.xlen(KEYS.kv_events_stream)
        # The counter is evicted: numbering resumes after the log's last entry.
        last = (await _log(client))[-1].sequence_number
        await client.delete(KEYS.kv_events_seq)
        _serve(bm, "after", [300, 301, 302, 303, 1])
        mirror.note_step("w-b", SchedulerOutput(), [])
        await mirror.flush()
        after = (await _log(client))[-1].sequence_number
        await client.aclose()
        return length, last, after

    length, last, after = asyncio.run(main())
    assert last == 601
    assert 100 <= length < 300  # approximate trimming: whole stream nodes go
    assert after == last + 1


def test_no_events_when_disabled(redis_server):
    async def main():
        client = await _fresh_client(redis_server)
        bm = BlockManager(16, BLOCK_SIZE)
        mirror = RedisMirror(client, "sched-off", kv_events_max_len=0)
        mirror.track("w-off", bm, [0] * 16, lambda: STATS)
        _serve(bm, "a", list(range(50, 59)))
        mirror.note_step("w-off", SchedulerOutput(), [])
        await mirror.flush()
        exists = await client.exists(KEYS.kv_events_stream)
        cached = await client.hlen(KEYS.kv_cached_key("w-off"))
        await client.aclose()
        return exists, cached

    exists, cached = asyncio.run(main())
    assert exists == 0 and cached == 2  # the mirror itself still works
