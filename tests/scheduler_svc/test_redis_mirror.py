"""Block state mirrored to a real Redis and rebuilt from it."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from gridllm.common.contract import SchedulerOutput
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.sampling_params import SamplingParams
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.redis_mirror import RedisMirror
from scheduler_svc.request import Request

BLOCK_SIZE = 4


def _request(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, prompt, SamplingParams(temperature=0.0))


def _run_and_free(bm: BlockManager, request: Request) -> None:
    blocks, num_computed = bm.get_computed_blocks(request)
    request.num_computed_tokens = num_computed
    assert bm.allocate_slots(request, request.num_tokens - num_computed, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    bm.free(request)


def test_restore_cached_blocks_reproduces_the_prefix_cache():
    source = BlockManager(16, BLOCK_SIZE)
    prompt = list(range(100, 113))  # three full blocks and one token
    _run_and_free(source, _request("a", prompt))
    entries = {h: (b.block_id, b.token_ids) for h, b in source.cached_blocks.items()}
    entries[12345] = (99, (1, 2, 3, 4))  # a block id outside the pool is skipped
    target = BlockManager(16, BLOCK_SIZE)
    assert target.restore_cached(entries) == 3
    hit_blocks, num_hit = target.get_computed_blocks(_request("b", prompt))
    want_blocks, want_hit = source.get_computed_blocks(_request("c", prompt))
    assert num_hit == want_hit == 12
    assert [b.block_id for b in hit_blocks] == [b.block_id for b in want_blocks]
    # Restored blocks are free but evicted only after the never-used ones.
    assert target.num_free_blocks == 16
    assert list(target.free_queue)[-3:] == sorted(b.block_id for b in hit_blocks) or \
        set(list(target.free_queue)[-3:]) == {b.block_id for b in hit_blocks}


def test_mirror_flush_then_restore_into_a_new_scheduler(redis_server):
    worker_id = "w-flush"

    async def main():
        client = aioredis.from_url(redis_server)
        await client.delete(*[k(worker_id) for k in (
            KEYS.kv_cached_key, KEYS.kv_state_key, KEYS.kv_tables_key)])
        bm = BlockManager(8, BLOCK_SIZE)
        versions = [0] * 8
        mirror = RedisMirror(client, "sched-1", ttl=3.0)
        restored = await mirror.restore(worker_id, "instance-1", bm, versions)
        mirror.track(worker_id, bm, versions, lambda: {"num_running": 0, "num_waiting": 0})
        running = _request("running", list(range(200, 209)))
        running.num_computed_tokens = 0
        bm.allocate_slots(running, running.num_tokens)
        _run_and_free(bm, _request("done", list(range(300, 309))))
        output = SchedulerOutput(finished_req_ids={"running", "done"})
        mirror.note_step(worker_id, output, [])
        await mirror.flush()
        cached = await client.hgetall(KEYS.kv_cached_key(worker_id))
        tables = await client.hgetall(KEYS.kv_tables_key(worker_id))
        state = await client.hgetall(KEYS.kv_state_key(worker_id))
        # Fill the pool with other tokens: the "done" blocks are evicted and must vanish.
        evict = _request("evict", list(range(400, 420)))
        assert bm.allocate_slots(evict, 20) is not None
        mirror.note_step(worker_id, SchedulerOutput(), [])
        await mirror.flush()
        after_evict = await client.hgetall(KEYS.kv_cached_key(worker_id))
        # A new scheduler of the same worker instance sees what is cached now.
        fresh = BlockManager(8, BLOCK_SIZE)
        num_restored = await RedisMirror(client, "sched-2").restore(
            worker_id, "instance-1", fresh, versions)
        # The worker overwrote block 0 since (a step the mirror never saw completed).
        bumped = list(versions)
        bumped[0] += 1
        fewer = await RedisMirror(client, "sched-3").restore(
            worker_id, "instance-1", BlockManager(8, BLOCK_SIZE), bumped)
        other = BlockManager(8, BLOCK_SIZE)
        num_other = await RedisMirror(client, "sched-4").restore(
            worker_id, "instance-2", other, versions)
        await client.aclose()
        return (restored, bm, cached, tables, state, after_evict, fresh, num_restored, num_other,
                fewer)

    (restored, bm, cached, tables, state, after_evict, fresh, num_restored,
     num_other, fewer) = asyncio.run(main())
    assert restored == 0
    assert len(cached) == 4  # two full blocks of each 9-token prompt
    assert tables == {b"running": b"0,1,2"}  # "done" was freed: no table
    assert int(state[b"num_free_blocks"]) == 5 and int(state[b"num_blocks"]) == 8
    assert state[b"instance_id"] == b"instance-1"
    live = {str(h).encode() for h in bm.cached_blocks}
    done_hashes = {h for h, v in cached.items() if v.split(b":")[2].startswith(b"30")}
    assert len(done_hashes) == 2 and not done_hashes & set(after_evict)
    assert set(after_evict) == live
    assert num_restored == len(live)
    assert {h: b.block_id for h, b in fresh.cached_blocks.items()} == {
        h: b.block_id for h, b in bm.cached_blocks.items()}
    assert 0 in {b.block_id for b in bm.cached_blocks.values()}
    assert fewer == num_restored - 1
    # A restarted worker (another instance) has an empty KV cache: nothing restored.
    assert num_other == 0


def test_heartbeat_publishes_the_scheduler_with_a_ttl(redis_server):
    async def main():
        client = aioredis.from_url(redis_server)
        entry = {"scheduler_id": "s-beat", "address": "127.0.0.1:1", "worker_ids": ["w"]}
        mirror = RedisMirror(client, "s-beat", registry=lambda: entry, ttl=2.0)
        await mirror.beat()
        key = KEYS.scheduler_key("s-beat")
        value, ttl_ms = json.loads(await client.get(key)), await client.pttl(key)
        await mirror.close()
        gone = await client.exists(key)
        await client.aclose()
        return value, ttl_ms, gone

    value, ttl_ms, gone = asyncio.run(main())
    assert value["address"] == "127.0.0.1:1" and value["worker_ids"] == ["w"]
    assert 0 < ttl_ms <= 2000
    assert gone == 0


def test_mirror_is_written_again_in_full_after_redis_restarts_empty(tmp_path):
    """Redis killed (SIGKILL) and restarted without persistence: the mirror catches up with
    every cached block and block table, those mirrored before the outage included."""
    import subprocess

    from tests.redis_fixture import _free_port, _wait_ready, redis_binary

    binary = redis_binary()
    if binary is None:
        import pytest

        pytest.skip("no redis-server available")
    port = _free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--save", "", "--appendonly", "no"]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ready(port, proc)
        return proc

    worker_id = "w-outage"
    proc = start()

    async def wait_for(predicate, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await predicate():
            assert asyncio.get_running_loop().time() < deadline, "mirror did not catch up"
            await asyncio.sleep(0.05)

    async def main():
        nonlocal proc
        client = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=1.0)
        bm = BlockManager(32, BLOCK_SIZE)
        mirror = RedisMirror(client, "sched-outage", registry=lambda: {"address": "x"}, ttl=1.0)
        mirror.track(worker_id, bm, [0] * 32, lambda: {"num_running": 0, "num_waiting": 0})
        mirror.start()
        cached_key = KEYS.kv_cached_key(worker_id)
        try:
            before = _request("before", list(range(200, 209)))
            _run_and_free(bm, before)
            running = _request("running", list(range(300, 309)))
            assert bm.allocate_slots(running, running.num_tokens) is not None
            mirror.note_step(worker_id, SchedulerOutput(), [])
            await wait_for(lambda: _hlen(client, cached_key, 4))
            proc.kill()
            proc.wait()
            # Steps go on while Redis is down: a new prefix is cached meanwhile.
            _run_and_free(bm, _request("during", list(range(400, 409))))
            mirror.note_step(worker_id, SchedulerOutput(), [])
            await asyncio.sleep(0.3)
            proc = start()  # empty: nothing was persisted
            await wait_for(lambda: _hlen(client, cached_key, 6))
            stored = {int(k) for k in await client.hkeys(cached_key)}
            tables = await client.hgetall(KEYS.kv_tables_key(worker_id))
            want_tables = {r.encode(): ",".join(map(str, ids)).encode()
                           for r, ids in bm.block_tables().items()}
            return stored, set(bm.cached_entries()), tables, want_tables
        finally:
            await mirror.close()
            await client.aclose()

    try:
        stored, want_stored, tables, want_tables = asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()
    # Two full blocks of each of the three 9-token prompts, and the running request's table.
    assert len(want_stored) == 6 and stored == want_stored
    assert set(want_tables) == {b"running"} and tables == want_tables


async def _hlen(client, key: str, want: int) -> bool:
    try:
        return await client.hlen(key) == want
    except Exception:  # noqa: BLE001 - Redis is down or restarting
        return False
