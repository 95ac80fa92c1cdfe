"""A stopping scheduler drains: its Submit streams in flight run to their end, a new Submit
gets UNAVAILABLE. Liveness and readiness are separate."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridllm.common.grpc_utils import LIVENESS_SERVICE
from gridllm.v1 import generate_pb2, scheduler_pb2_grpc
from scheduler_svc.server import SchedulerServer, SchedulerServiceConfig
from tests.scheduler_svc.harness import (
    collect,
    engine_configs,
    read_rest,
    run,
    running_worker,
    submit_request,
    wait_until,
)
from tests.worker_svc.tiny_models import make_tiny_model

PROMPTS = [[40 + i, 41, 42, 43] for i in range(3)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def test_a_stopping_scheduler_finishes_its_streams_and_refuses_new_ones(model_path):
    async def main():
        async with running_worker(model_path) as worker:
            server = SchedulerServer(SchedulerServiceConfig(
                scheduler_config=engine_configs(model_path)[2],
                worker_addresses=[worker.address], discovery_interval=0.1))
            await server.start()
            await wait_until(lambda: len(server.pool.alive_links()) == 1, 10.0, "worker linked")
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                undisturbed = [(await collect(stub, submit_request(
                    f"u{i}", p, max_tokens=40, ignore_eos=True)))[0]
                    for i, p in enumerate(PROMPTS)]
                calls = [stub.Submit(submit_request(f"d{i}", p, max_tokens=40, ignore_eos=True))
                         for i, p in enumerate(PROMPTS)]
                firsts = [await call.read() for call in calls]
                stop = asyncio.create_task(server.stop(grace=20.0))
                await wait_until(lambda: server.service.is_draining, 5.0, "drain begun")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await collect(stub, submit_request("late", PROMPTS[0], max_tokens=2))
                rests = [await read_rest(call) for call in calls]
                await stop
            return undisturbed, firsts, rests, refused.value

    undisturbed, firsts, rests, refused = run(main())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    for want, first, rest in zip(undisturbed, firsts, rests, strict=True):
        assert list(first.token_ids) + [t for r in rest for t in r.token_ids] == want
        assert rest[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH


def test_liveness_is_serving_while_readiness_waits_for_a_worker():
    async def main():
        server = SchedulerServer(SchedulerServiceConfig(discovery_interval=0.1))
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                ready = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                live = await health.Check(
                    health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5)
                return ready.status, live.status
        finally:
            await server.stop(grace=0)

    ready, live = run(main())
    assert ready == health_pb2.HealthCheckResponse.NOT_SERVING
    assert live == health_pb2.HealthCheckResponse.SERVING
