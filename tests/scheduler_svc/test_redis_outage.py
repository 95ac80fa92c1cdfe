"""Services (re)started while Redis is down come up and join once it answers: a scheduler
starts and keeps looking for workers, a worker waits to register (alive, not ready), and the
two meet in the registry when Redis is back."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gridllm.common.grpc_utils import LIVENESS_SERVICE, free_port
from gridllm.launcher import ManagedProcess, redis_server_binary, wait_for_redis
from scheduler_svc.server import SchedulerServer, SchedulerServiceConfig
from tests.scheduler_svc.harness import (
    collect,
    engine_configs,
    run,
    submit_request,
    wait_until,
)
from tests.worker_svc.tiny_models import make_tiny_model
from worker_svc.server import WorkerOptions, WorkerServer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def test_scheduler_and_worker_started_without_redis_join_when_it_is_back(model_path,
                                                                        tmp_path):
    try:
        binary = redis_server_binary()
    except RuntimeError:
        pytest.skip("no Redis-compatible server")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis = ManagedProcess("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                           str(tmp_path / "redis.log"))

    async def status(address: str, service: str = "") -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5)
            return reply.status

    async def main():
        scheduler = SchedulerServer(SchedulerServiceConfig(
            scheduler_config=engine_configs(model_path)[2], redis_url=url,
            discovery_interval=0.1, heartbeat_ttl=3.0))
        await scheduler.start()
        worker = WorkerServer(*engine_configs(model_path)[:3],
                              WorkerOptions(redis_url=url, heartbeat_ttl=3.0))
        starting = asyncio.create_task(worker.start())
        try:
            # The model is loaded: what the worker waits for now is Redis.
            await wait_until(lambda: worker.servicer.info is not None, 30.0, "the model loaded")
            await asyncio.sleep(0.5)
            address = f"127.0.0.1:{worker.service.port}"
            before = (await status(address), await status(address, LIVENESS_SERVICE),
                      starting.done())
            redis.start()
            await asyncio.get_running_loop().run_in_executor(None, wait_for_redis, url,
                                                             redis, 10.0)
            await asyncio.wait_for(starting, 10.0)
            after = await status(address)
            await wait_until(lambda: len(scheduler.pool.alive_links()) == 1, 10.0,
                             "the worker linked")
            async with grpc.aio.insecure_channel(scheduler.address) as channel:
                from gridllm.v1 import scheduler_pb2_grpc

                tokens, _ = await collect(scheduler_pb2_grpc.SchedulerStub(channel),
                                          submit_request("r", [5, 6, 7], max_tokens=4))
            return before, after, tokens
        finally:
            if not starting.done():
                starting.cancel()
            await worker.stop(0)
            await scheduler.stop(0)

    try:
        before, after, tokens = run(main(), timeout=90)
    finally:
        redis.stop(grace_s=2.0)
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    # Loaded and alive, not ready (not registered) while Redis is down.
    assert before == (not_serving, serving, False)
    assert after == serving
    assert len(tokens) == 4
