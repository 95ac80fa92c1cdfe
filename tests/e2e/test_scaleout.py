"""A 2 x 2 stack: two schedulers with two workers each (their own worker groups), the
router routing between them; a second router on the same Redis answers alike."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from gridllm.client import Client
from gridllm.common.config import CacheConfig
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.sampling_params import SamplingParams
from gridllm.launcher import LocalStack, StackConfig
from gridllm.v1 import generate_pb2, generate_pb2_grpc
from scheduler_svc.server import SchedulerServiceConfig

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
# 134 tokens (eight full blocks) shared by the requests below.
PREFIX = "Serving many schedulers: a prefix shared by every request of this test, long enough. " * 2


@pytest.fixture(scope="module")
def stack(tiny_served_model, redis_server, tmp_path_factory):
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/8"
    redis.Redis.from_url(url).flushdb()
    config = StackConfig(
        model=tiny_served_model, num_schedulers=2, num_workers=2, port=0, redis_url=url,
        log_dir=str(tmp_path_factory.mktemp("scaleout-logs")), startup_timeout_s=120.0,
        stop_grace_s=3.0, cache_config=CacheConfig(num_kv_blocks=128),
        scheduler_options=SchedulerServiceConfig(discovery_interval=0.3))
    with LocalStack(config) as running:
        yield running


def _loads(endpoint: str) -> generate_pb2.GetLoadsResponse:
    with grpc.insecure_channel(endpoint) as channel:
        return generate_pb2_grpc.GenerationStub(channel).GetLoads(
            generate_pb2.GetLoadsRequest(), timeout=10)


def _events(endpoint: str, start: int, until: int) -> list[generate_pb2.KvEvent]:
    """Events ``start..until`` replayed from a router."""
    events = []
    with grpc.insecure_channel(endpoint) as channel:
        call = generate_pb2_grpc.GenerationStub(channel).SubscribeKvEvents(
            generate_pb2.SubscribeKvEventsRequest(start_sequence_number=start), timeout=10)
        for batch in call:
            events += batch.events
            if events[-1].sequence_number >= until:
                call.cancel()
                break
    return [e for e in events if e.sequence_number <= until]


async def _wait_for(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def _last_sequence(url: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    try:
        (entry_id, _), = r.xrevrange(KEYS.kv_events_stream, count=1)
        return int(entry_id.decode().partition("-")[2])
    finally:
        r.close()


def test_each_scheduler_links_only_its_own_group(stack):
    import redis

    loads = _loads(stack.endpoint)
    assert len(loads.schedulers) == 2
    worker_sets = [{w.worker_id for w in s.workers} for s in loads.schedulers]
    assert [len(ws) for ws in worker_sets] == [2, 2] and not worker_sets[0] & worker_sets[1]
    r = redis.Redis.from_url(stack.redis_url)
    try:
        for scheduler in loads.schedulers:
            entry = json.loads(r.get(KEYS.scheduler_key(scheduler.scheduler_id)))
            groups = {json.loads(r.get(KEYS.worker_key(w.worker_id)))["worker_group"]
                      for w in scheduler.workers}
            assert groups == {entry["worker_group"]} and entry["worker_group"]
    finally:
        r.close()


def test_shared_prefix_follows_its_cache_and_events_replay_alike_on_two_routers(
        stack, tiny_served_model):
    from router.kv_index import RecentRoutes
    from router.server import RouterOptions, RouterServer

    with Client(stack.endpoint, timeout=60) as client:
        first = client.generate(PREFIX + "one", GREEDY)
        assert first.num_cached_tokens == 0
        for i in range(4):
            again = client.generate(PREFIX + f"then {i}", GREEDY)
            # Routed to the scheduler holding the prefix: its blocks are hit.
            assert again.num_cached_tokens >= 64, i
    # The event log holds the prefix's blocks; a second router replays the same log.
    loads = _loads(stack.endpoint)
    last = _last_sequence(stack.redis_url)
    holder = {w.worker_id: s.address for s in loads.schedulers for w in s.workers
              if w.prefix_cache_hit_rate > 0}

    async def second_router():
        router = RouterServer(RouterOptions(model=tiny_served_model, redis_url=stack.redis_url))
        port = await router.start("127.0.0.1:0")
        try:
            # A router that never saw these requests routes the prefix where it is cached:
            # it learnt that from the shared Redis alone (no per-request state).
            await router.pool.wait_alive(30)
            await _wait_for(lambda: len(router.pool.alive()) == 2
                            and router.kv_follower.index.has_state, 10)
            prompt = router.tokenizer.encode(PREFIX + "via another router")
            picks = set()
            for _ in range(6):
                router.pool.recent = RecentRoutes()  # only the index may guide the pick
                picks.add((await router.pool.pick(prompt, 5)).address)
            loop = asyncio.get_running_loop()
            return picks, await loop.run_in_executor(
                None, lambda: (_events(f"127.0.0.1:{port}", 1, last),
                               _events(stack.endpoint, 1, last),
                               _loads(f"127.0.0.1:{port}")))
        finally:
            await router.stop()

    picks, (from_b, from_a, loads_b) = asyncio.run(second_router())
    assert len(set(holder.values())) == 1 and picks == set(holder.values())
    assert [e.sequence_number for e in from_a] == list(range(1, last + 1))
    assert from_a == from_b
    assert any(e.HasField("block_stored") for e in from_a)
    workers = {w.worker_id for s in loads.schedulers for w in s.workers}
    assert {e.worker_id for e in from_a} <= workers
    assert {s.scheduler_id for s in loads_b.schedulers} == {
        s.scheduler_id for s in loads.schedulers}
    hit = [w for s in loads.schedulers for w in s.workers if w.prefix_cache_hit_rate > 0]
    assert hit, "no worker reports prefix-cache hits"


def test_a_dead_scheduler_is_routed_around(stack):
    with Client(stack.endpoint, timeout=60) as client:
        stack.schedulers[1].kill()
        deadline = time.monotonic() + 20
        while len(_loads(stack.endpoint).schedulers) != 1:
            assert time.monotonic() < deadline, "the router still lists the dead scheduler"
            time.sleep(0.2)
        for i in range(6):
            output = client.generate(f"{i} after the kill", GREEDY)
            assert output.outputs[0].finish_reason is not None
    with open(stack.router.log_path) as log:
        assert "resubmitting" not in log.read()
