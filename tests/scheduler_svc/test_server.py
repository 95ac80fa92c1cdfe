"""The scheduler service over real gRPC on loopback, with real workers (tiny random model)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridllm.common.sampling_params import SamplingParams
from gridllm.engine import EngineCore
from gridllm.v1 import generate_pb2, scheduler_pb2
from tests.scheduler_svc.harness import (
    collect,
    engine_configs,
    read_rest,
    run,
    running_scheduler,
    running_worker,
    submit_request,
    wait_until,
)
from tests.worker_svc.tiny_models import make_tiny_model

# Prompts of 3, 9 and 21 tokens: one block, several, and chunked over two steps.
PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19],
           [30 + i for i in range(21)]]
EOS = 1


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def reference_tokens(model_path: str, prompts, params: SamplingParams) -> list[list[int]]:
    """Greedy tokens of the in-process engine on the same model and configs."""
    engine = EngineCore(*engine_configs(model_path), eos_token_id=EOS)
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(f"r{i}", prompt, params))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for update in engine.step():
            out[update.req_id] += update.new_token_ids
    return [out[f"r{i}"] for i in range(len(prompts))]


def test_submit_streams_the_engine_core_tokens(model_path):
    params = dict(max_tokens=12)
    expected = reference_tokens(model_path, PROMPTS, SamplingParams(temperature=0.0, **params))

    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            results = await asyncio.gather(*(
                collect(stub, submit_request(f"q{i}", p, **params)) for i, p in enumerate(PROMPTS)))
            stats = await stub.GetStats(generate_pb2.GetServerStatsRequest())
            return results, stats

    results, stats = run(main())
    for (tokens, responses), want in zip(results, expected, strict=True):
        assert tokens == want
        assert responses[-1].finish_reason in (generate_pb2.FINISH_REASON_LENGTH,
                                               generate_pb2.FINISH_REASON_STOP)
        assert all(r.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED
                   for r in responses[:-1])
    assert stats.num_requests_running == stats.num_requests_waiting == 0
    assert [w.kv_blocks_free for w in stats.workers] == [w.kv_blocks_total for w in stats.workers]


def test_cancelled_submit_frees_its_blocks(model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            call = stub.Submit(submit_request("long", PROMPTS[2], max_tokens=200, ignore_eos=True))
            first = await call.read()
            link = server.pool.links[worker.worker_id]
            bm = link.scheduler.block_manager
            assert first.token_ids and bm.num_free_blocks < bm.num_blocks
            call.cancel()
            await wait_until(lambda: bm.num_free_blocks == bm.num_blocks
                             and not link.scheduler.has_unfinished_requests(), 5.0,
                             "blocks freed after cancel")
            # The worker dropped the request too.
            await wait_until(lambda: not worker.runner.requests, 5.0, "worker state dropped")
            tokens, _ = await collect(stub, submit_request("after", PROMPTS[0], max_tokens=3))
            assert len(tokens) == 3

    run(main())


def test_abort_with_reason_stop_ends_the_stream_with_stop(model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            call = stub.Submit(submit_request("s", PROMPTS[1], max_tokens=200, ignore_eos=True))
            await call.read()
            reply = await stub.Abort(scheduler_pb2.AbortRequest(
                request_ids=["s", "unknown"], reason=scheduler_pb2.ABORT_REASON_STOP))
            rest = await read_rest(call)
            return reply, rest

    reply, rest = run(main())
    assert list(reply.aborted_request_ids) == ["s"]
    assert rest[-1].finish_reason == generate_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize("field,request_kwargs", [
    ("temperature", dict(sampling_params=generate_pb2.SamplingParams(temperature=-1.0))),
    ("top_p", dict(sampling_params=generate_pb2.SamplingParams(top_p=0.0))),
    ("max_tokens", dict(sampling_params=generate_pb2.SamplingParams(max_tokens=0))),
    ("stop_token_ids", dict(sampling_params=generate_pb2.SamplingParams(stop_token_ids=[10**6]))),
    ("prompt", dict(prompt_token_ids=[])),
    ("max_model_len", dict(prompt_token_ids=[3] * 300)),
    ("prompt_token_ids", dict(prompt_token_ids=[10**6])),
    ("request_id", dict(request_id="")),
    ("logits_processors", dict(sampling_params=generate_pb2.SamplingParams(
        logits_processors=["no-such-processor"]))),
])
def test_invalid_requests_get_invalid_argument_naming_the_field(model_path, field,
                                                                request_kwargs):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            request = scheduler_pb2.SubmitRequest(request_id="bad", prompt_token_ids=[5, 6])
            for key, value in request_kwargs.items():
                if key == "sampling_params":
                    request.sampling_params.CopyFrom(value)
                elif key == "prompt_token_ids":
                    del request.prompt_token_ids[:]
                    request.prompt_token_ids.extend(value)
                else:
                    setattr(request, key, value)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, request)
            bm = server.pool.links[worker.worker_id].scheduler.block_manager
            return info.value, bm.num_free_blocks == bm.num_blocks

    error, all_free = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()
    assert all_free


def test_health_serving_once_a_worker_registers(model_path, redis_server):
    async def health(address: str) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            return reply.status

    async def main():
        async with running_scheduler(redis_url=redis_server) as (server, stub):
            before = await health(server.address)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, submit_request("x", PROMPTS[0]))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            async with running_worker(model_path, redis_server):
                await wait_until(lambda: server.pool.alive_links(), 10.0, "worker discovered")
                after = await health(server.address)
                tokens, _ = await collect(stub, submit_request("y", PROMPTS[0], max_tokens=2))
            return before, after, tokens

    before, after, tokens = run(main())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert after == health_pb2.HealthCheckResponse.SERVING
    assert len(tokens) == 2


def test_restarted_scheduler_hits_the_prefix_cached_before(model_path, redis_server):
    prompt = [40 + i for i in range(17)]  # four full blocks of 4

    async def main():
        async with running_worker(model_path, redis_server):
            async with running_scheduler(redis_url=redis_server) as (server, stub):
                first, responses = await collect(stub, submit_request("a", prompt, max_tokens=5))
                assert responses[-1].num_cached_tokens == 0
            # A new scheduler instance (new id) against the same worker and Redis.
            async with running_scheduler(redis_url=redis_server) as (server, stub):
                await wait_until(lambda: server.pool.alive_links(), 10.0, "worker relinked")
                second, responses = await collect(stub, submit_request("b", prompt, max_tokens=5))
                stats = await stub.GetStats(generate_pb2.GetServerStatsRequest())
            return first, second, responses[-1].num_cached_tokens, stats

    first, second, num_cached, stats = run(main())
    assert num_cached == 16
    assert stats.prefix_cache_hits == 16
    assert second == first  # the reused KV is the right KV


def test_two_workers_share_requests_and_one_stopping_leaves_the_other(model_path, redis_server):
    async def main():
        async with running_worker(model_path, redis_server) as w1, \
                running_worker(model_path, redis_server) as w2, \
                running_scheduler(redis_url=redis_server) as (server, stub):
            await wait_until(lambda: len(server.pool.alive_links()) == 2, 10.0,
                             "both workers linked")
            prompts = [[60 + 3 * i, 61 + i, 62] for i in range(4)]
            calls = [stub.Submit(submit_request(f"p{i}", p, max_tokens=40, ignore_eos=True))
                     for i, p in enumerate(prompts)]
            firsts = [await call.read() for call in calls]
            used = {r.worker_id for r in firsts}
            # Graceful stop: w1's running requests finish, new ones go to w2.
            stop = asyncio.create_task(w1.stop(grace=10))
            await wait_until(lambda: w1.worker_id not in {
                link.worker_id for link in server.pool.alive_links()}, 5.0, "w1 draining")
            late, late_responses = await collect(stub, submit_request("late", prompts[0],
                                                                      max_tokens=3))
            rests = [await read_rest(call) for call in calls]
            await asyncio.wait_for(stop, 10)
            tokens, after = await collect(stub, submit_request("after", prompts[1], max_tokens=3))
            return used, firsts, rests, late_responses, after, w1.worker_id, w2.worker_id

    used, firsts, rests, late, after, w1_id, w2_id = run(main())
    assert used == {w1_id, w2_id}
    for first, rest in zip(firsts, rests, strict=True):
        assert rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 40
    assert late[0].worker_id == w2_id and after[0].worker_id == w2_id
    assert after[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH


def test_killed_worker_requests_resume_on_the_other_worker(model_path, redis_server):
    """A worker whose Step stream is cut mid-request: its requests continue on the surviving
    worker, and every stream's tokens equal an undisturbed run's (no gap, no repeat)."""
    prompts = [[70 + i, 71, 72] for i in range(4)]

    async def main():
        async with running_worker(model_path, redis_server) as w1, \
                running_worker(model_path, redis_server) as w2, \
                running_scheduler(redis_url=redis_server) as (server, stub):
            await wait_until(lambda: len(server.pool.alive_links()) == 2, 10.0,
                             "both workers linked")
            undisturbed = [(await collect(stub, submit_request(f"u{i}", p, max_tokens=60,
                                                               ignore_eos=True)))[0]
                           for i, p in enumerate(prompts)]
            calls = [stub.Submit(submit_request(f"k{i}", p, max_tokens=60, ignore_eos=True))
                     for i, p in enumerate(prompts)]
            firsts = [await call.read() for call in calls]
            assert {r.worker_id for r in firsts} == {w1.worker_id, w2.worker_id}
            # No grace: the Step stream is cut mid-request.
            await w1.service.server.stop(0)
            rests = [await read_rest(call) for call in calls]
            stats = await stub.GetStats(generate_pb2.GetServerStatsRequest())
            return undisturbed, firsts, rests, stats, w1.worker_id, w2.worker_id

    undisturbed, firsts, rests, stats, w1_id, w2_id = run(main())
    moved = 0
    for want, first, rest in zip(undisturbed, firsts, rests, strict=True):
        tokens = list(first.token_ids) + [t for r in rest for t in r.token_ids]
        assert tokens == want
        assert rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        if first.worker_id == w1_id:
            moved += 1
            assert rest[-1].worker_id == w2_id
    assert moved >= 1
    # Every block of the surviving worker is free again.
    (worker,) = stats.workers
    assert worker.kv_blocks_free == worker.kv_blocks_total


def test_killed_last_worker_fails_its_requests_with_unavailable(model_path, redis_server):
    async def main():
        async with running_worker(model_path, redis_server) as w1, \
                running_scheduler(redis_url=redis_server) as (server, stub):
            await wait_until(lambda: len(server.pool.alive_links()) == 1, 10.0, "worker linked")
            call = stub.Submit(submit_request("last", [5, 6, 7], max_tokens=200,
                                              ignore_eos=True))
            await call.read()
            await w1.service.server.stop(0)
            try:
                await read_rest(call)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details()
            return None, None

    code, details = run(main())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "no other worker" in details


class HeldLock:
    """A lock the test takes and gives back, released on ``release`` only while held."""

    def __init__(self, lock):
        self.lock, self.held = lock, False

    def acquire(self):
        self.lock.acquire()
        self.held = True

    def release(self):
        if self.held:
            self.held = False
            self.lock.release()


def test_full_queue_is_refused_with_resource_exhausted_and_a_retry_hint(model_path):
    from gridllm.common.config import SchedulerConfig
    from scheduler_svc.servicer import RETRY_AFTER_KEY

    one_at_a_time = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16)

    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address], scheduler_config=one_at_a_time,
                                  max_num_queued_reqs=2, max_num_queued_tokens=20) as (server,
                                                                                       stub):
            # Holding the worker's runner lock holds its steps, so the queue stays as it is;
            # a failure while it is held must release it, or the worker's shutdown waits on
            # its runner thread forever.
            held = HeldLock(worker.servicer._lock)
            try:
                return await queue_checks(server, stub, held)
            finally:
                held.release()

    async def queue_checks(server, stub, held):
        await wait_until(lambda: server.pool.alive_links(), 10.0, "worker linked")
        held.acquire()

        def submit(i):
            return stub.Submit(submit_request(f"q{i}", [40 + i, 41, 42], max_tokens=200,
                                              ignore_eos=True))

        # q0 is running before the others are sent (three calls at once may reach the
        # scheduler in any order, the third before q0 left the queue, and be refused).
        calls = [submit(0)]
        firsts = [asyncio.ensure_future(calls[0].read())]
        (link,) = server.pool.alive_links()
        await wait_until(lambda: link.scheduler.num_running == 1, 10.0, "q0 running",
                         state=lambda: (link.scheduler.num_running, server.pool.queued()))
        calls += [submit(1), submit(2)]
        firsts += [asyncio.ensure_future(call.read()) for call in calls[1:]]
        await wait_until(lambda: server.pool.queued()[0] == 2, 10.0, "two waiting",
                         state=server.pool.queued)
        refused = stub.Submit(submit_request("over", [50, 51, 52], max_tokens=5))
        with pytest.raises(grpc.aio.AioRpcError) as by_count:
            await asyncio.wait_for(refused.read(), 10.0)
        retry = dict(await refused.trailing_metadata()).get(RETRY_AFTER_KEY)
        for call in calls[1:]:
            call.cancel()
        held.release()
        await firsts[0]
        await wait_until(lambda: server.pool.queued()[0] == 0, 10.0, "queue emptied")
        # One waiting request of 3 tokens: 3 + 18 more tokens exceed 20.
        held.acquire()
        waiting = stub.Submit(submit_request("w", [60, 61, 62], max_tokens=5))
        await wait_until(lambda: server.pool.queued()[0] == 1, 10.0, "one waiting")
        with pytest.raises(grpc.aio.AioRpcError) as by_tokens:
            await asyncio.wait_for(collect(stub, submit_request(
                "big", list(range(100, 118)), max_tokens=5)), 10.0)
        held.release()
        calls[0].cancel()
        tokens, _ = await collect(stub, submit_request("after", [70, 71], max_tokens=3))
        rest = await read_rest(waiting)
        await wait_until(lambda: server.pool.queued()[0] == 0, 10.0, "all done")
        stats = await stub.GetStats(generate_pb2.GetServerStatsRequest())
        return by_count.value, retry, by_tokens.value, tokens, rest, stats

    by_count, retry, by_tokens, tokens, rest, stats = run(main())
    assert by_count.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_num_queued_reqs=2" in by_count.details()
    assert retry is not None and int(retry) > 0
    assert by_tokens.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_num_queued_tokens=20" in by_tokens.details()
    assert len(tokens) == 3 and rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    (worker,) = stats.workers
    assert worker.kv_blocks_free == worker.kv_blocks_total


def test_hung_worker_is_noticed_by_its_missed_heartbeats(model_path, redis_server):
    """``python -m worker_svc`` frozen with SIGSTOP mid-request: its Step stream stays open,
    but once its registry entry expires the scheduler takes it for lost and the request
    resumes on the other worker, equal to an undisturbed run."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from gridllm.common.grpc_utils import free_port, wait_for_serving

    repo_root = Path(__file__).resolve().parents[2]
    prompt = [90, 91, 92]

    async def main():
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker_svc", "--model", model_path, "--port", str(port),
             "--redis-url", redis_server, "--heartbeat-ttl", "1", "--block-size", "4",
             "--num-kv-blocks", "64", "--max-num-batched-tokens", "16"],
            cwd=repo_root, env={**os.environ, "GRIDLLM_LOGGING_LEVEL": "WARNING"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_for_serving(f"127.0.0.1:{port}", timeout=60)
            async with running_worker(model_path, redis_server) as survivor, \
                    running_scheduler(redis_url=redis_server, heartbeat_ttl=1.0) as (server,
                                                                                     stub):
                await wait_until(lambda: len(server.pool.alive_links()) == 2, 20.0,
                                 "both workers linked")
                want, _ = await collect(stub, submit_request("u", prompt, max_tokens=80,
                                                             ignore_eos=True))
                frozen_id = next(link.worker_id for link in server.pool.alive_links()
                                 if link.worker_id != survivor.worker_id)
                # Fill the survivor so the pick sends the next request to the other worker.
                calls = [stub.Submit(submit_request(f"h{i}", prompt, max_tokens=80,
                                                    ignore_eos=True)) for i in range(2)]
                firsts = [await call.read() for call in calls]
                assert frozen_id in {r.worker_id for r in firsts}
                proc.send_signal(signal.SIGSTOP)
                frozen_at = asyncio.get_running_loop().time()
                rests = [await read_rest(call) for call in calls]
                seconds = asyncio.get_running_loop().time() - frozen_at
                return want, firsts, rests, seconds, survivor.worker_id
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    want, firsts, rests, seconds, survivor_id = run(main(), timeout=120)
    # Bounded by the heartbeat TTL (1 s) and the scheduler's check, well before gRPC
    # keepalives (10 s + 5 s) would notice the frozen peer.
    assert seconds < 12.0
    for first, rest in zip(firsts, rests, strict=True):
        assert list(first.token_ids) + [t for r in rest for t in r.token_ids] == want
        assert rest[-1].worker_id == survivor_id


def test_killed_scheduler_process_restarts_with_the_prefix_cache(model_path, redis_server):
    """``python -m scheduler_svc`` killed with SIGKILL mid-request, then started again."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import redis.asyncio as aioredis

    from gridllm.common.grpc_utils import free_port, wait_for_serving
    from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
    from gridllm.v1 import scheduler_pb2_grpc

    repo_root = Path(__file__).resolve().parents[2]
    prompt = [80 + i for i in range(17)]

    def start_scheduler(port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "scheduler_svc", "--port", str(port), "--redis-url",
             redis_server, "--discovery-interval", "0.1", "--max-num-batched-tokens", "16"],
            cwd=repo_root, env={**os.environ, "GRIDLLM_LOGGING_LEVEL": "WARNING"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def main():
        client = aioredis.from_url(redis_server)
        procs = []
        try:
            async with running_worker(model_path, redis_server) as worker:
                cached_key = KEYS.kv_cached_key(worker.worker_id)
                results = []
                for attempt in range(2):
                    port = free_port()
                    procs.append(start_scheduler(port))
                    address = f"127.0.0.1:{port}"
                    await wait_for_serving(address, timeout=30)
                    async with grpc.aio.insecure_channel(address) as channel:
                        stub = scheduler_pb2_grpc.SchedulerStub(channel)
                        results.append(await collect(
                            stub, submit_request(f"p{attempt}", prompt, max_tokens=5)))
                        if attempt == 0:
                            # Mirrored behind the step loop: wait for the four full blocks.
                            for _ in range(200):
                                if await client.hlen(cached_key) >= 4:
                                    break
                                await asyncio.sleep(0.02)
                            busy = stub.Submit(submit_request("busy", [3, 4, 5], max_tokens=200,
                                                              ignore_eos=True))
                            await busy.read()
                            procs[0].send_signal(signal.SIGKILL)
                            procs[0].wait(10)
                            with pytest.raises(grpc.aio.AioRpcError):
                                await read_rest(busy)
                return results
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            await client.aclose()

    (first, first_responses), (second, second_responses) = run(main())
    assert first_responses[-1].num_cached_tokens == 0
    assert second_responses[-1].num_cached_tokens == 16
    assert second == first


def test_resubmitted_outputs_count_as_output(model_path):
    # A penalty makes every token depend on the earlier outputs: a resumed request must see
    # them as outputs (and count them against max_tokens) to continue the same run.
    params = dict(max_tokens=10, frequency_penalty=1.5, presence_penalty=0.5, ignore_eos=True)
    expected = reference_tokens(model_path, PROMPTS[1:2],
                                SamplingParams(temperature=0.0, **params))[0]

    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            request = submit_request("resumed", PROMPTS[1], **params)
            request.output_token_ids.extend(expected[:4])
            return await collect(stub, request)

    tokens, responses = run(main())
    assert tokens == expected[4:]
    assert responses[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH


def test_resubmitted_outputs_outside_the_vocab_are_refused(model_path):
    async def main():
        async with running_worker(model_path) as worker, \
                running_scheduler([worker.address]) as (server, stub):
            request = submit_request("bad", PROMPTS[0], max_tokens=4)
            request.output_token_ids.append(10**6)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, request)
            return info.value

    error = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_token_ids" in error.details()
