"""The worker service: Step stream, exclusivity, reconnects, health and registration."""

from __future__ import annotations

import asyncio
import copy
import json
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig
from gridllm.common.contract import NewRequestData, SchedulerOutput
from gridllm.common.convert import runner_output_from_pb, scheduler_output_to_pb
from gridllm.common.redis_keys import DEFAULT_KEYS as KEYS
from gridllm.common.sampling_params import SamplingParams
from gridllm.v1 import worker_pb2, worker_pb2_grpc
from tests.worker_svc.step_driver import run_requests
from worker_svc.server import WorkerOptions, WorkerServer

CONFIGS = dict(cache_config=CacheConfig(block_size=4, num_kv_blocks=48),
               scheduler_config=SchedulerConfig(max_num_batched_tokens=16))


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    from worker_svc.model_runner import ModelRunner

    return ModelRunner(ModelConfig(model=tiny_model_dir("llama"), skip_tokenizer_init=True),
                       CONFIGS["cache_config"], CONFIGS["scheduler_config"])


class _Recorder:
    """Passes steps to a runner and keeps a copy of each SchedulerOutput."""

    def __init__(self, runner):
        self.runner, self.block_size, self.inputs = runner, runner.block_size, []

    def execute_model(self, scheduler_output):
        self.inputs.append(copy.deepcopy(scheduler_output))
        return self.runner.execute_model(scheduler_output)


def _server(runner, redis_url=None) -> WorkerServer:
    return WorkerServer(ModelConfig(model="tiny-llama"), CONFIGS["cache_config"],
                        CONFIGS["scheduler_config"], WorkerOptions(redis_url=redis_url),
                        runner=runner)


async def _steps(stub, requests: list[worker_pb2.StepRequest]) -> list[worker_pb2.StepResponse]:
    call = stub.Step(iter(requests))
    return [r async for r in call]


def test_step_stream_returns_what_the_runner_returns(runner):
    prompts = [[5, 6, 7], [20 + i for i in range(13)]]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=2)]
    recorder = _Recorder(runner)
    runner.reset_requests()
    expected, expected_steps = run_requests(recorder, prompts, params, max_new_tokens=5,
                                            chunk_budget=8)
    runner.reset_requests()

    async def main():
        server = _server(runner)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                info = await stub.GetInfo(worker_pb2.GetWorkerInfoRequest())
                requests = [scheduler_output_to_pb(out, i + 1)
                            for i, out in enumerate(recorder.inputs)]
                return info, await _steps(stub, requests)
        finally:
            await server.stop(0)

    info, responses = asyncio.run(main())
    assert info.num_kv_blocks == runner.num_kv_blocks and info.block_size == 4
    assert info.vocab_size == runner.vocab_size and info.instance_id
    assert [r.step_id for r in responses] == list(range(1, len(recorder.inputs) + 1))
    for got, want in zip(responses, expected_steps, strict=True):
        got = runner_output_from_pb(got)
        assert got.req_ids == want.req_ids
        assert got.sampled_token_ids == want.sampled_token_ids
        assert got.logprobs.keys() == want.logprobs.keys()
        for req_id, items in want.logprobs.items():
            assert [g.token_ids for g in got.logprobs[req_id]] == [w.token_ids for w in items]
            for g, w in zip(got.logprobs[req_id], items, strict=True):
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)


def _new_request_step(step_id: int, req_id: str, block_ids: list[int]) -> worker_pb2.StepRequest:
    out = SchedulerOutput(scheduled_new_reqs=[NewRequestData(
        req_id, [5, 6, 7], SamplingParams(temperature=0.0), [], block_ids, 0)],
        num_scheduled_tokens={req_id: 3}, total_num_scheduled_tokens=3)
    return scheduler_output_to_pb(out, step_id)


def test_one_scheduler_at_a_time_and_a_new_stream_keeps_the_kv_cache(runner):
    async def main():
        server = _server(runner)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                first = stub.Step()
                await first.write(_new_request_step(1, "a", [0]))
                await first.read()
                assert "a" in runner.requests
                kv_before = runner.kv_caches[0][0][0].clone()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _steps(stub, [_new_request_step(1, "b", [1])])
                await first.done_writing()
                assert await first.read() is grpc.aio.EOF
                # The new stream starts without "a"; a delta for it is an error.
                second = stub.Step()
                await second.write(worker_pb2.StepRequest(step_id=1, scheduled_cached_reqs=[
                    worker_pb2.CachedRequest(req_id="a", num_computed_tokens=3,
                                             num_scheduled_tokens=1)]))
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await second.read()
                kv_after = runner.kv_caches[0][0][0]
                return refused.value, unknown.value, kv_before, kv_after
        finally:
            await server.stop(0)

    refused, unknown, kv_before, kv_after = asyncio.run(main())
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT and "'a'" in unknown.details()
    assert kv_before.abs().sum() > 0 and bool((kv_after == kv_before).all())


def test_health_is_not_serving_until_the_model_is_loaded(runner, monkeypatch):
    import worker_svc.model_runner as model_runner

    loaded = threading.Event()

    def slow_runner(*args, **kwargs):
        loaded.wait(10)
        return runner

    monkeypatch.setattr(model_runner, "ModelRunner", slow_runner)

    async def status(port: int) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="gridllm.v1.Worker"), timeout=5)
            return reply.status

    async def main():
        server = _server(None)
        start = asyncio.create_task(server.start())
        while not server.service.port:
            await asyncio.sleep(0.01)
        before = await status(server.service.port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.service.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as loading:
                await worker_pb2_grpc.WorkerStub(channel).GetInfo(
                    worker_pb2.GetWorkerInfoRequest(), timeout=5)
        loaded.set()
        await asyncio.wait_for(start, 10)
        after = await status(server.service.port)
        await server.stop(0)
        return before, loading.value.code(), after

    before, loading, after = asyncio.run(main())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert loading == grpc.StatusCode.UNAVAILABLE
    assert after == health_pb2.HealthCheckResponse.SERVING


def test_registers_in_redis_with_a_ttl_and_deregisters_on_stop(runner, redis_server):
    import redis.asyncio as aioredis

    async def main():
        client = aioredis.from_url(redis_server)
        server = _server(runner, redis_server)
        await server.start()
        key = KEYS.worker_key(server.worker_id)
        entry = json.loads(await client.get(key))
        ttl_ms = await client.pttl(key)
        await server.stop(0)
        gone = await client.exists(key)
        await client.aclose()
        return server, entry, ttl_ms, gone

    server, entry, ttl_ms, gone = asyncio.run(main())
    assert entry["address"] == server.address and entry["worker_id"] == server.worker_id
    assert entry["num_kv_blocks"] == runner.num_kv_blocks
    assert 0 < ttl_ms <= server.options.heartbeat_ttl * 1000
    assert gone == 0
