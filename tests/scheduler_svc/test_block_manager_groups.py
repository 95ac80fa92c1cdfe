"""KV groups in the block manager: one pool, a table per group, windowed groups give back
the blocks before their window, prefix hits need each windowed group's visible blocks."""

import asyncio

import pytest
import redis.asyncio as aioredis

from gridllm.common.contract import SchedulerOutput
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.sampling_params import SamplingParams
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.redis_mirror import RedisMirror
from scheduler_svc.request import Request

BS = 4
# A global group, then two local groups of window 6 (the tiny Gemma 2's layout).
WINDOWS = (None, 6, 6)


def make_request(req_id, tokens):
    return Request(req_id, list(tokens), SamplingParams(max_tokens=1000))


def decode_to(bm, request, num_tokens, chunk):
    """Run ``request`` (prompt in chunks of ``chunk``, then one token per step) until it
    holds ``num_tokens`` tokens; returns the most blocks held per group at once."""
    most = [0] * bm.num_groups
    blocks, num_hit = bm.get_computed_blocks(request)
    first = True
    while request.num_computed_tokens < num_tokens:
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(7)
        pending = request.num_tokens - request.num_computed_tokens - (num_hit if first else 0)
        ids = bm.allocate_group_slots(request, min(chunk, pending), blocks if first else None)
        assert ids is not None and len(ids) == bm.num_groups
        request.num_computed_tokens += min(chunk, pending) + (num_hit if first else 0)
        first = False
        most = [max(m, bm.num_held_blocks(request.req_id, g)) for g, m in enumerate(most)]
        # Every group's table covers the same positions.
        tables = [bm.get_block_ids(request.req_id), *bm.get_group_block_ids(request.req_id)]
        assert {len(t) for t in tables} == {-(-request.num_computed_tokens // BS)}
    return most


def test_local_groups_give_back_blocks_the_global_group_keeps_all():
    bm = BlockManager(64, BS, group_windows=WINDOWS)
    request = make_request("a", range(30))
    most = decode_to(bm, request, 60, chunk=8)
    assert most[0] == 60 // BS
    # The window, the step's tokens (a chunk of 8 at most) and the partial blocks.
    for g in (1, 2):
        assert most[g] <= -(-(6 + 8) // BS) + 1 < most[0]
    held = sum(bm.num_held_blocks("a", g) for g in range(3))
    assert bm.num_free_blocks == 64 - held
    bm.free(request)
    assert bm.num_free_blocks == 64
    assert bm.group_block_tables() == {} and bm.get_group_block_ids("a") == [[], []]


def test_allocation_across_groups_is_all_or_nothing():
    bm = BlockManager(8, BS, group_windows=WINDOWS)
    request = make_request("a", range(9))  # 3 blocks in each of 3 groups: 9 > 8
    assert bm.allocate_group_slots(request, 9) is None
    assert bm.num_free_blocks == 8
    assert bm.allocate_group_slots(request, 8) is not None  # 2 blocks per group
    assert bm.num_free_blocks == 2
    assert len({*bm.get_block_ids("a"), *sum(bm.get_group_block_ids("a"), [])}) == 6


def test_prefix_hit_needs_only_the_local_window_and_fills_the_rest_with_placeholders():
    bm = BlockManager(64, BS, group_windows=WINDOWS)
    prompt = list(range(100, 124))  # 6 full blocks
    first = make_request("a", prompt)
    decode_to(bm, first, len(prompt), chunk=24)
    bm.free(first)
    second = make_request("b", prompt + [1, 2])
    blocks, num_hit = bm.get_computed_blocks(second)
    assert num_hit == 24
    ids = bm.allocate_group_slots(second, 2, blocks)
    # Query at 24 sees keys 19..: local groups need blocks 4 and 5 only.
    first_visible = (24 - 6 + 1) // BS
    for g in (1, 2):
        assert ids[g][:first_visible] == [0] * first_visible
        assert bm.num_held_blocks("b", g) == 6 + 1 - first_visible
    assert bm.num_held_blocks("b", 0) == 7
    bm.free(second)
    assert bm.num_free_blocks == 64


def test_prefix_hit_shrinks_to_what_every_local_group_has_cached():
    bm = BlockManager(64, BS, group_windows=WINDOWS)
    prompt = list(range(100, 124))
    first = make_request("a", prompt)
    decode_to(bm, first, len(prompt), chunk=24)
    bm.free(first)
    # Drop local group 2's block 5 from its cache: a hit of 6 blocks needs it, a hit of 5
    # needs blocks 3 and 4 (query at 20 sees keys 15..).
    block_hash = bm._block_hashes(make_request("x", prompt), 24)[5]
    del bm._cached[2][block_hash]
    second = make_request("b", prompt + [1])
    assert bm.get_computed_blocks(second)[1] == 20
    # Without the first group's blocks there is no hit at all.
    bm.cached_blocks.clear()
    assert bm.get_computed_blocks(make_request("c", prompt + [1]))[1] == 0


def test_group_events_and_tables_are_mirrored_and_restored(redis_server):
    worker_id = "w-groups"

    async def main():
        client = aioredis.from_url(redis_server)
        await client.delete(*[k(worker_id) for k in (
            KEYS.kv_cached_key, KEYS.kv_state_key, KEYS.kv_tables_key)])
        bm = BlockManager(32, BS, group_windows=WINDOWS)
        versions = [0] * 32
        mirror = RedisMirror(client, "sched-1", ttl=3.0)
        await mirror.restore(worker_id, "instance-1", bm, versions)
        mirror.track(worker_id, bm, versions, lambda: {"num_running": 0, "num_waiting": 0})
        done = make_request("done", range(200, 209))
        decode_to(bm, done, done.num_tokens, chunk=9)
        bm.free(done)
        running = make_request("running", range(300, 305))
        assert bm.allocate_group_slots(running, 5) is not None
        mirror.note_step(worker_id, SchedulerOutput(finished_req_ids={"running", "done"}), [])
        await mirror.flush()
        cached = await client.hgetall(KEYS.kv_cached_key(worker_id))
        tables = await client.hgetall(KEYS.kv_tables_key(worker_id))
        fresh = BlockManager(32, BS, group_windows=WINDOWS)
        restored = await RedisMirror(client, "sched-2").restore(
            worker_id, "instance-1", fresh, versions)
        await client.aclose()
        return bm, cached, tables, fresh, restored

    bm, cached, tables, fresh, restored = asyncio.run(main())
    # Two full blocks of "done" and one of "running" in each of the three groups.
    assert sorted(k.decode().rpartition(":")[0] for k in cached) == [""] * 3 + ["1"] * 3 + [
        "2"] * 3
    want = ";".join(",".join(map(str, ids)) for ids in bm.group_block_tables()["running"])
    assert tables == {b"running": want.encode()}
    assert restored == 9
    for g in range(3):
        assert fresh.cached_entries(g) == bm.cached_entries(g)
    assert fresh.get_computed_blocks(make_request("again", range(200, 210)))[1] == 8


def test_group_windows_are_checked():
    with pytest.raises(ValueError, match="kv_window"):
        BlockManager(8, BS, group_windows=(None, 0))
    with pytest.raises(ValueError, match="group_windows"):
        BlockManager(8, BS, kv_window=4, group_windows=(None, 4))
